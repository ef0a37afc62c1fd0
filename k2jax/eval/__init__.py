"""Cross-framework reproducibility checks: K2's loss of given weights on the rows of a step
(`eval-loss`), k2jax against transformers on the same rows (`compare-hf`), and a run's loss
curve against K2's W&B export (`compare-curves`). See docs/reproduce.md."""
