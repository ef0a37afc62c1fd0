"""k2jax: LLM360 K2-65B pretraining in JAX/Flax, for TPU pods."""

__version__ = "0.1.0"
