"""Scaled dot-product attention behind one switch: `xla` (plain einsums), `pallas` (k2jax's
fused flash-attention kernel, k2jax.kernels) or `splash` (jax's Pallas splash attention), both
TPU kernels, or `cudnn` (cuDNN's flash attention on NVIDIA GPUs, k2jax/kernels/gpu_attention.py).
Causal over the whole row: K2 packs documents without resetting attention at EOS."""

from __future__ import annotations

import contextlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.errors import ConfigError

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


# What `auto` runs on a TPU: jax's splash kernel, Google's production TPU attention, until a
# measurement on a chip shows k2jax's own kernel at least as fast (`benchmarks/attention.py`
# times both and prints which one this should be; docs/attention.md).
TPU_DEFAULT_ATTENTION = "splash"


TPU_KERNELS = ("pallas", "splash")


def resolve_attention_impl(name: str, q=None) -> str:
    """`auto`: splash on a TPU, cuDNN on an NVIDIA GPU when it takes q (bf16/fp16; fp32
    evaluation stays on `xla`), else `xla`."""
    backend = jax.default_backend()
    if name == "auto":
        if backend == "tpu":
            return TPU_DEFAULT_ATTENTION
        if backend == "gpu":
            from k2jax.kernels.gpu_attention import cudnn_supports
            return "cudnn" if q is None or cudnn_supports(q) else "xla"
        return "xla"
    if name in TPU_KERNELS and backend == "gpu":
        # Off a TPU these run in Pallas interpret mode (CPU tests, AOT TPU compiles); on a GPU
        # that would be a silent crawl.
        raise ConfigError("model.attention", f"{name!r} is a TPU Pallas kernel; on a GPU use "
                          "'auto' or 'cudnn'")
    return name


# Query rows per block of the xla path. Blocks let causal attention skip the logits above the
# diagonal (about 40% of them at 4 blocks) and keep each softmax pass to a few MiB, which is
# what makes it fast on CPU (see docs/performance.md); 64-256 measured alike.
XLA_QUERY_BLOCK = 128


def xla_attention(q_BxSxNxD, k_BxSxKxD, v_BxSxKxD, *, causal: bool = True,
                  segment_ids_BxS: Optional[jnp.ndarray] = None,
                  block: int = XLA_QUERY_BLOCK) -> jnp.ndarray:
    """Reference attention; logits and softmax in fp32, output in q's dtype. GQA via groups.

    Heads-major and blocked over queries: query block [a, b) attends to keys [0, b) when
    causal, so no logit above the diagonal block is computed (one block when `block` does not
    divide the sequence). A query group's G heads share their K/V head and are stacked on the
    row axis, so every product is a plain batched dot."""
    batch, seq, num_heads, head_dim = q_BxSxNxD.shape
    num_kv = k_BxSxKxD.shape[2]
    groups = num_heads // num_kv
    block = block if seq % block == 0 else seq
    q_BxKxGxSxD = q_BxSxNxD.reshape(batch, seq, num_kv, groups, head_dim).transpose(0, 2, 3, 1, 4)
    k_BxKxSxD, v_BxKxSxD = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)
    outputs = []
    for start in range(0, seq, block):
        stop = start + block
        keys = stop if causal else seq
        q_BxKxRxD = q_BxKxGxSxD[:, :, :, start:stop].reshape(batch, num_kv, groups * block,
                                                              head_dim)
        logits_BxKxRxT = jnp.einsum("bkrd,bktd->bkrt", q_BxKxRxD, k_BxKxSxD[:, :, :keys],
                                    preferred_element_type=jnp.float32) * head_dim ** -0.5
        mask_BxSxT = ((start + jnp.arange(block))[None, :, None] >= jnp.arange(keys)[None, None]
                      if causal else jnp.ones((1, block, keys), bool))
        if segment_ids_BxS is not None:
            mask_BxSxT = mask_BxSxT & (segment_ids_BxS[:, start:stop, None]
                                       == segment_ids_BxS[:, None, :keys])
        mask_Bx1xRxT = jnp.tile(mask_BxSxT[:, None], (1, 1, groups, 1))
        logits_BxKxRxT = jnp.where(mask_Bx1xRxT, logits_BxKxRxT, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits_BxKxRxT, axis=-1).astype(v_BxSxKxD.dtype)
        out_BxKxRxD = jnp.einsum("bkrt,bktd->bkrd", probs, v_BxKxSxD[:, :, :keys])
        outputs.append(out_BxKxRxD.reshape(batch, num_kv, groups, block, head_dim))
    out_BxKxGxSxD = jnp.concatenate(outputs, axis=3)
    return out_BxKxGxSxD.transpose(0, 3, 1, 2, 4).reshape(batch, seq, num_heads, head_dim)


def dot_product_attention(q, k, v, *, impl: str, causal: bool = True, segment_ids=None,
                          block_q: Optional[int] = None, block_kv: Optional[int] = None,
                          splash_backward: Optional[dict] = None):
    """q [B, S, N, D], k/v [B, S, K, D] -> [B, S, N, D] in q's dtype. `splash_backward`:
    splash's backward_blocks / fused_backward (k2jax/kernels/splash.py), splash only."""
    impl = resolve_attention_impl(impl, q)
    if impl == "xla":
        return xla_attention(q, k, v, causal=causal, segment_ids_BxS=segment_ids)
    if impl == "cudnn":
        from k2jax.kernels.gpu_attention import check_cudnn_inputs, gpu_attention
        check_cudnn_inputs(q, jax.default_backend())
        return gpu_attention(q, k, v, causal=causal, segment_ids_BxS=segment_ids)
    if impl in ("pallas", "splash"):
        extra = (splash_backward or {}) if impl == "splash" else {}
        return _kernel_attention(impl, q, k, v, causal=causal, segment_ids=segment_ids,
                                 block_q=block_q, block_kv=block_kv, **extra)
    raise ValueError(f"model.attention: unknown implementation {impl!r}")


def _kernel_attention(impl: str, q, k, v, **kwargs):
    """A Pallas kernel, one call per device under shard_map when a mesh is active: a
    pallas_call is opaque to XLA's partitioner, which would otherwise gather q, k, v."""
    from k2jax.kernels import (flash_attention, sharded_flash_attention,
                               sharded_splash_attention, splash_attention)

    single, sharded = {"pallas": (flash_attention, sharded_flash_attention),
                       "splash": (splash_attention, sharded_splash_attention)}[impl]
    kwargs["interpret"] = _PALLAS_INTERPRET
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return single(q, k, v, **kwargs)
    rules = dict(nn.get_logical_axis_rules())
    return sharded(q, k, v, mesh=mesh, batch_axes=rules.get("batch"),
                   head_axes=rules.get("heads"), **kwargs)
