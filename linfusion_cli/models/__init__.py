"""Loading checkpoints (hub, folder, single file), model families, and adapters users bring."""
