"""Pallas TPU kernels. `flash_attention` is the fused causal/segmented attention used by the
model when `model.attention` is "pallas" (or "auto" on TPU)."""

from k2jax.kernels.block_sizes import BlockSizes, default_block_sizes
from k2jax.kernels.flash_attention import flash_attention, sharded_flash_attention

__all__ = ["BlockSizes", "default_block_sizes", "flash_attention", "sharded_flash_attention"]
