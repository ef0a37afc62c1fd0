"""Scaled dot-product attention behind one switch: `xla` (plain einsums) or `pallas` (fused
flash-attention kernel from k2jax.kernels). Causal over the whole row: K2 packs documents
without resetting attention at EOS."""

from __future__ import annotations

import contextlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.interpreters import pxla

# None: Pallas kernels run in interpret mode off TPU. Ahead-of-time TPU compiles on a CPU host
# set False (see `pallas_interpret`), so Mosaic lowers the real kernel.
_PALLAS_INTERPRET: Optional[bool] = None


@contextlib.contextmanager
def pallas_interpret(value: Optional[bool]):
    global _PALLAS_INTERPRET
    previous, _PALLAS_INTERPRET = _PALLAS_INTERPRET, value
    try:
        yield
    finally:
        _PALLAS_INTERPRET = previous


def resolve_attention_impl(name: str) -> str:
    if name == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return name


def xla_attention(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD, *, causal: bool = True,
                  segment_ids_BxS: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Reference attention; logits and softmax in fp32, output in q's dtype. GQA via groups."""
    batch, seq, num_heads, head_dim = q_BxSxNxD.shape
    num_kv = k_BxSxKxD.shape[2]
    groups = num_heads // num_kv
    q_BxSxKxGxD = q_BxSxNxD.reshape(batch, seq, num_kv, groups, head_dim)
    logits_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k_BxSxKxD,
                                  preferred_element_type=jnp.float32) * head_dim ** -0.5
    mask_BxSxT = jnp.ones((1, seq, seq), bool)
    if causal:
        mask_BxSxT = jnp.tril(mask_BxSxT)
    if segment_ids_BxS is not None:
        mask_BxSxT = mask_BxSxT & (segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :])
    logits_BxKxGxSxT = jnp.where(mask_BxSxT[:, None, None], logits_BxKxGxSxT,
                                 jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits_BxKxGxSxT, axis=-1).astype(v_BxSxKxD.dtype)
    out_BxSxKxGxD = jnp.einsum("bkgst,btkd->bskgd", probs, v_BxSxKxD)
    return out_BxSxKxGxD.reshape(batch, seq, num_heads, head_dim)


def dot_product_attention(q, k, v, *, impl: str, causal: bool = True, segment_ids=None,
                          block_q: Optional[int] = None, block_kv: Optional[int] = None):
    """q [B, S, N, D], k/v [B, S, K, D] -> [B, S, N, D] in q's dtype."""
    impl = resolve_attention_impl(impl)
    if impl == "xla":
        return xla_attention(q, k, v, causal=causal, segment_ids_BxS=segment_ids)
    if impl == "pallas":
        return _pallas_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                 block_q=block_q, block_kv=block_kv)
    raise ValueError(f"model.attention: unknown implementation {impl!r}")


def _pallas_attention(q, k, v, **kwargs):
    """The fused kernel, one call per device under shard_map when a mesh is active: a
    pallas_call is opaque to XLA's partitioner, which would otherwise gather q, k, v."""
    from k2jax.kernels import flash_attention, sharded_flash_attention

    kwargs["interpret"] = _PALLAS_INTERPRET
    mesh = pxla.thread_resources.env.physical_mesh
    if mesh.empty:
        return flash_attention(q, k, v, **kwargs)
    rules = dict(nn.get_logical_axis_rules())
    return sharded_flash_attention(q, k, v, mesh=mesh, batch_axes=rules.get("batch"),
                                   head_axes=rules.get("heads"), **kwargs)
