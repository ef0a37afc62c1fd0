"""Training: K2's recipe (schedule, AdamW), the sharded step, checkpoints, metrics, spikes."""
