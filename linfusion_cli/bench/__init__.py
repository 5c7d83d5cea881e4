"""Benchmarks with random weights (`linfusion bench`)."""
