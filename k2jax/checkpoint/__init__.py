"""Orbax checkpoints: training state (manager) and parameter-only weights (conversion, init)."""
