"""Rotary position embeddings in Hugging Face's rotate-half layout (K2 = HF Llama: no q/k
permutation when loading HF weights). Frequencies are computed in fp32; cos/sin are cast to
the compute dtype before use, as K2's training code did."""

from __future__ import annotations

import jax.numpy as jnp


def rope_cos_sin(positions_BxS: jnp.ndarray, head_dim: int, theta: float, dtype
                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, S, head_dim] for int positions [B, S]."""
    inv_freq_H = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles_BxSxH = positions_BxS.astype(jnp.float32)[..., None] * inv_freq_H
    angles_BxSxD = jnp.concatenate([angles_BxSxH, angles_BxSxH], axis=-1)  # [f, f]
    return jnp.cos(angles_BxSxD).astype(dtype), jnp.sin(angles_BxSxD).astype(dtype)


def apply_rope(x_BxSxNxD: jnp.ndarray, cos_BxSxD: jnp.ndarray, sin_BxSxD: jnp.ndarray
               ) -> jnp.ndarray:
    half = x_BxSxNxD.shape[-1] // 2
    x1, x2 = x_BxSxNxD[..., :half], x_BxSxNxD[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxD[:, :, None, :], sin_BxSxD[:, :, None, :]
    return x_BxSxNxD * cos + rotated * sin
