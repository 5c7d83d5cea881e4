"""What every layer shares and nothing above it: errors, events, setting declarations and values, plan data,
small text helpers. Imports no other package of ours, and no torch."""
