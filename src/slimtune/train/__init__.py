"""slimtune train: run config, data, loop, checkpoints."""
