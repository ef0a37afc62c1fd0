"""Pallas TPU kernels. `flash_attention` is k2jax's fused causal/segmented attention, used by
the model when `model.attention` is "pallas"; `splash_attention` wraps jax's splash kernel behind
the same interface (`model.attention: splash`, and "auto" on TPU)."""

from k2jax.kernels.block_sizes import BlockSizes, default_block_sizes
from k2jax.kernels.flash_attention import flash_attention, sharded_flash_attention
from k2jax.kernels.splash import sharded_splash_attention, splash_attention

__all__ = ["BlockSizes", "default_block_sizes", "flash_attention", "sharded_flash_attention",
           "sharded_splash_attention", "splash_attention"]
