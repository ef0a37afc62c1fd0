"""Attention on NVIDIA GPUs: jax's cuDNN fused flash attention (`jax.nn.dot_product_attention`,
implementation "cudnn"), the model's `model.attention: cudnn` and what "auto" picks on a GPU.

Why cuDNN and not a Pallas GPU kernel: cuDNN's fused attention is NVIDIA's own FlashAttention
(Hopper-tuned, forward and backward, causal blocks skipped), maintained with the driver and
called by jax with a sharding rule; jax's Pallas Triton ops are deprecated (Pallas changelog,
"Unreleased" after 0.11.0) and a Mosaic GPU kernel of our own would need Hopper time to tune.

The same function with implementation="xla" is jax's reference path: the CPU tests hold it to
the model's own `xla` attention, so the cuDNN path differs from it only inside cuDNN."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from k2jax.errors import ConfigError

# cuDNN's flash attention takes 16-bit inputs only and head dims that are multiples of 8, up to
# 256 on Hopper (K2: bf16, 128).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supports(q) -> bool:
    """Whether cuDNN's fused attention takes q's dtype and head dim (for `auto`)."""
    head_dim = q.shape[-1]
    return q.dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 256


def check_cudnn_inputs(q, backend: str) -> None:
    """One line (ConfigError on model.attention) when the cuDNN path cannot run."""
    if backend != "gpu":
        raise ConfigError("model.attention", f"'cudnn' needs an NVIDIA GPU, and jax runs on "
                          f"'{backend}' here; use 'auto' or 'xla'")
    if not cudnn_supports(q):
        raise ConfigError("model.attention", f"'cudnn' takes bfloat16/float16 queries with a "
                          f"head dim that is a multiple of 8 up to 256, got {q.dtype} and "
                          f"{q.shape[-1]} (model.compute_dtype, model.head_dim); use 'xla'")


def segment_mask(segment_ids_BxS: jnp.ndarray) -> jnp.ndarray:
    """Bool [B, 1, S, S]: a query sees a key of its own document (segment) only."""
    return (segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :])[:, None]


def gpu_attention(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD, *, causal: bool = True,
                  segment_ids_BxS: Optional[jnp.ndarray] = None,
                  implementation: str = "cudnn") -> jnp.ndarray:
    """q [B, S, N, D], k/v [B, S, K, D] (GQA by groups) -> [B, S, N, D] in q's dtype.

    Causal masking is cuDNN's own (blocks above the diagonal are skipped). Segment ids become a
    boolean mask that jax hands cuDNN as an additive bias: exact, but it materialises [B, S, S]
    and takes the slower biased kernel, so only packed-with-reset data (reset_attention_mask)
    pays for it."""
    mask = None if segment_ids_BxS is None else segment_mask(segment_ids_BxS)
    out = jax.nn.dot_product_attention(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD, mask=mask,
                                       is_causal=causal, implementation=implementation)
    return out.astype(q_BxSxNxD.dtype)
