"""Rotary position embeddings in Hugging Face's rotate-half layout (K2 = HF Llama: no q/k
permutation when loading HF weights).

Inverse frequencies are computed in fp32 and rounded to `freq_dtype`: K2's Megatron kept them
in a module buffer that `Float16Module`'s `.bfloat16()` rounded to bf16, and its
`RotaryEmbedding.forward` cast them back to fp32 for the angles (positions x frequencies in
fp32), so `freq_dtype="bfloat16"` is K2 as trained and "float32" is transformers. Angles and
cos/sin are fp32 either way; cos/sin are cast to the compute dtype before use, as K2's
`apply_rotary_pos_emb` did (`freqs.cos().to(torch.bfloat16)`)."""

from __future__ import annotations

import jax.numpy as jnp


def inverse_frequencies(head_dim: int, theta: float, freq_dtype: str = "float32"
                        ) -> jnp.ndarray:
    """float32 [head_dim // 2]: theta^(-2i / head_dim), rounded to `freq_dtype` and back."""
    inv_freq_H = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return inv_freq_H.astype(freq_dtype).astype(jnp.float32)


def rope_cos_sin(positions_BxS: jnp.ndarray, head_dim: int, theta: float, dtype,
                 freq_dtype: str = "float32") -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, S, head_dim] (`dtype`) for int positions [B, S]; angles in fp32
    from frequencies rounded to `freq_dtype` (model.rope_freq_dtype)."""
    inv_freq_H = inverse_frequencies(head_dim, theta, freq_dtype)
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
