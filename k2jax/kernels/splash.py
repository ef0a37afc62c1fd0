"""jax's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind the same
interface as k2jax's `flash_attention`, so the model can switch kernels with one setting.

Splash is Google's production TPU attention kernel (MaxText's default). What this wrapper adds:
- Layout: splash takes one batch element as [heads, seq, head_dim]; the model's [B, S, N, D] is
  transposed in and out and the kernel vmapped over the batch.
- Scale: splash applies no softmax scale, so q is multiplied by `sm_scale` first (one rounding
  in q's dtype, the same as a bf16 model that scales q before the kernel).
- GQA/MQA: splash's multi-head kernel takes k/v with kv_heads dividing heads (query head h reads
  kv head h // (heads / kv_heads)); kv is never repeated in HBM.
- Ragged sequences: splash needs both block sizes to divide the sequence. For causal attention
  the sequence is padded at the end: no real query can see a padded key (they are all in its
  future), padded query rows are sliced away (zero output cotangent). Padded positions take the
  last real segment id so no row is empty.
- Masks are static: the causal block structure is computed in NumPy at trace time, so fully
  hidden blocks cost neither DMA nor compute (splash's block-sparse grid).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from k2jax.kernels.block_sizes import NUM_LANES, block_sizes_for_call, round_up
from k2jax.kernels.flash_attention import _validate, resolve_interpret
from k2jax.kernels.per_device import per_device_attention


def _splash_modules():
    """splash's kernel and mask modules (imported lazily: they pull in Pallas TPU lowering)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel, splash_attention_mask as masks)
    return kernel, masks


def _make_kernel(heads: int, seq: int, causal: bool, blocks: "SplashBlocks", interpret: bool):
    """A splash kernel for one static configuration (`blocks`: forward, dq and dkv sizes;
    the dkv kernel also computes dq when `blocks.fused_backward`). Not cached here: the kernel
    holds jax arrays (the block mask), which must not outlive a trace; splash caches the NumPy
    mask processing itself."""
    kernel, masks = _splash_modules()
    head_mask = masks.CausalMask((seq, seq)) if causal else masks.FullMask((seq, seq))
    fused = {"use_fused_bwd_kernel": True} if blocks.fused_backward else {}
    sizes = kernel.BlockSizes(
        block_q=blocks.q, block_kv=blocks.kv, block_kv_compute=blocks.kv,
        block_q_dkv=blocks.q_dkv, block_kv_dkv=blocks.kv_dkv,
        block_kv_dkv_compute=blocks.kv_dkv,
        block_q_dq=None if blocks.fused_backward else blocks.q_dq,
        block_kv_dq=None if blocks.fused_backward else blocks.kv_dq, **fused)
    return kernel.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Block sizes of splash's three kernels (MaxText's sa_block_* settings): forward (q, kv),
    dq (q_dq, kv_dq) and dk/dv (q_dkv, kv_dkv); `fused_backward`: one kernel computes dq with
    dk/dv (splash's use_fused_bwd_kernel), the dq sizes are then unused."""

    q: int
    kv: int
    q_dq: int
    kv_dq: int
    q_dkv: int
    kv_dkv: int
    fused_backward: bool = False

    def sizes(self) -> tuple[int, ...]:
        used = (self.q, self.kv, self.q_dkv, self.kv_dkv)
        return used if self.fused_backward else used + (self.q_dq, self.kv_dq)


def _check_block(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or value <= 0 or value % NUM_LANES):
        raise ValueError(f"{name}: splash attention needs a positive multiple of "
                         f"{NUM_LANES}, got {value!r}")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                     segment_ids: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
                     block_q: Optional[int] = None, block_kv: Optional[int] = None,
                     backward_blocks: Optional[tuple[int, int, int, int]] = None,
                     fused_backward: bool = False,
                     interpret: Optional[bool] = None) -> jax.Array:
    """softmax(q k^T * sm_scale + mask) v with jax's splash kernels (forward and backward).

    Args and result as `k2jax.kernels.flash_attention`: q [batch, seq, heads, head_dim],
    k/v [batch, seq, kv_heads, head_dim] (bfloat16 or float32, kv_heads divides heads),
    segment_ids int [batch, seq] or None, sm_scale default head_dim ** -0.5; returns
    [batch, seq, heads, head_dim] in q's dtype. Blocks (None: the generation's default) must be
    multiples of 128 in both modes (splash computes in whole 128-lane tiles); a sequence they
    do not divide is padded, which only causal attention allows. `backward_blocks`: (block_q_dq,
    block_kv_dq, block_q_dkv, block_kv_dkv) of the backward kernels, None: the forward's;
    `fused_backward`: dq computed in the dk/dv kernel. `interpret`: None = interpret mode unless
    the default backend is TPU; pass False for ahead-of-time TPU compiles.
    """
    _validate(q, k, v, segment_ids)
    interpret = bool(resolve_interpret(interpret))
    batch, seq, heads, head_dim = q.shape
    for name, value in (("block_q", block_q), ("block_kv", block_kv)):
        _check_block(name, value)
    if backward_blocks is not None and len(backward_blocks) != 4:
        raise ValueError(f"backward_blocks: expected (block_q_dq, block_kv_dq, block_q_dkv, "
                         f"block_kv_dkv), got {backward_blocks!r}")
    for name, value in zip(("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv"),
                           backward_blocks or ()):
        _check_block(name, value)
    # Defaults for short sequences (and interpret mode's) can be under 128: round them up.
    block_q, block_kv = (round_up(b, NUM_LANES) for b in
                         block_sizes_for_call(seq, block_q, block_kv, interpret))
    blocks = SplashBlocks(block_q, block_kv,
                          *(backward_blocks or (block_q, block_kv, block_q, block_kv)),
                          fused_backward=bool(fused_backward))
    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale!r}")

    padded_len = round_up(seq, math.lcm(*blocks.sizes()))
    if padded_len != seq and not causal:
        raise ValueError(f"q: splash attention without a causal mask needs its block sizes "
                         f"{blocks.sizes()} to divide seq={seq}")
    pad = padded_len - seq

    def to_kernel(x):  # [B, S, H, D] -> [B, H, S_padded, D]
        return jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    q_k = to_kernel(q * jnp.asarray(sm_scale, q.dtype))
    k_k, v_k = to_kernel(k), to_kernel(v)
    kernel = _make_kernel(heads, padded_len, bool(causal), blocks, interpret)
    if segment_ids is None:
        out = jax.vmap(kernel)(q_k, k_k, v_k)
    else:
        splash_kernel, _ = _splash_modules()
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)], mode="edge")
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash_kernel.SegmentIds(q=s, kv=s)))(
            q_k, k_k, v_k, seg)
    return out.transpose(0, 2, 1, 3)[:, :seq].astype(q.dtype)


def sharded_splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh,
                             batch_axes=None, head_axes=None,
                             segment_ids: Optional[jax.Array] = None, **kwargs) -> jax.Array:
    """`splash_attention` on arrays sharded over `mesh`, one kernel call per device (see
    `per_device_attention`). Global shapes; kwargs as for `splash_attention`."""
    return per_device_attention(functools.partial(splash_attention, **kwargs), q, k, v,
                                mesh=mesh, batch_axes=batch_axes, head_axes=head_axes,
                                segment_ids=segment_ids)
