"""float64 NumPy attention and its gradients: the reference both attention paths are held to."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def reference_mask(seq, causal, segment_ids, diagonal=0):
    """Bool [B or 1, S, S]; `diagonal` shifts the causal boundary (mutation tests)."""
    mask = np.ones((1, seq, seq), bool)
    if causal:
        mask = mask & np.tril(np.ones((seq, seq), bool), k=diagonal)[None]
    if segment_ids is not None:
        segment_ids = np.asarray(segment_ids)
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def reference(q, k, v, do, mask, scale):
    """float64 attention and its gradients. q/do [B,S,H,D], k/v [B,S,KVH,D], mask [B|1,S,S].
    Returns o, dq, dk, dv (dk/dv summed over the query heads of each kv group)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    group = q.shape[2] // k.shape[2]
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, vr)
    dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", p, do)

    def fold(x):  # sum the query heads of each kv group
        b, s_, _, d = x.shape
        return x.reshape(b, s_, k.shape[2], group, d).sum(3)

    return o, dq, fold(dk), fold(dv)


def rel_err(x, ref):
    """max|err| / max|ref| (the figure the acceptance tolerances are stated in)."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def random_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype, segments):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, heads, head_dim), (batch, seq, kv_heads, head_dim),
              (batch, seq, kv_heads, head_dim), (batch, seq, heads, head_dim)]
    # Rounded to the test dtype first, so the reference sees exactly what the kernel sees.
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), dtype) for s in shapes)
    segment_ids = None
    if segments:
        # Sorted random ids: packed documents of random lengths, boundaries inside blocks.
        segment_ids = jnp.asarray(np.sort(rng.integers(0, segments, (batch, seq)), axis=1),
                                  jnp.int32)
    return q, k, v, do, segment_ids
