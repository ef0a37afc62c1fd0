"""The K2 model (LLaMA architecture) in Flax Linen, its loss and its parameter count."""

from k2jax.model.loss import masked_next_token_loss
from k2jax.model.transformer import K2Model

__all__ = ["K2Model", "masked_next_token_loss"]
