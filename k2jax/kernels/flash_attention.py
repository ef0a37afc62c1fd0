"""Fused (flash) attention for TPU in Pallas: public API, forward kernel, custom_vjp.

    out = flash_attention(q, k, v, causal=True)      # q [B, S, H, D], k/v [B, S, KVH, D]

The [S, S] score matrix never exists in HBM. The forward walks, for each (batch, head, q block),
over kv blocks with an online softmax in fp32 VMEM scratch (running max m, running sum l and
the unnormalised output acc), and saves the per-row log-sum-exp (lse) for the backward pass
(flash_attention_bwd.py), which recomputes probabilities from it block by block.

Layouts: with head_dim a multiple of 128 the kernels read [B, S, H*D] (a free reshape of the
model's [B, S, H, D]): a (block, head_dim) tile of it is lane-aligned, so no transposes are
needed around the kernel. Other head dims (64) use [B, H, S, D] (one transpose per tensor)
because a 64-wide tile of an H*64-wide row is not lane-aligned.

Blocks the causal mask hides entirely are skipped twice: `pl.when` skips their compute, and
the kv index map is clamped to the last visible block, so the pipeline sees an unchanged block
index and issues no DMA for them either. See docs/attention.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels.block_sizes import (INTERPRET_BLOCK_MULTIPLE, NUM_LANES, NUM_SUBLANES,
                                       TPU_BLOCK_MULTIPLE, Geometry, block_sizes_for_call, idiv,
                                       round_up)
from k2jax.kernels import flash_attention_bwd
from k2jax.kernels.flash_tiles import (NN_DIMS, NT_DIMS, Layout, Static, load_segments,
                                       run_block, segment_specs, stats_spec)
from k2jax.kernels.per_device import per_device_attention

# Finite, so masked logits never produce inf - inf = nan; far below any real logit.
MASK_VALUE = -1e30
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)


# --------------------------------------------------------------------------------- forward


def _forward_kernel(*refs, static: Static, precision, save_lse: bool):
    """One grid step (b, h, q block i, kv block j). Refs are VMEM tiles:
    q [bq, D], k/v [bkv, D], optional segment ids, outputs o [bq, D] and (if save_lse) lse
    [bq, 128],
    scratch m/l [bq, 128] fp32 (lane-replicated) and acc [bq, D] fp32."""
    geo = static.geometry
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    qseg_ref, kvseg_ref = refs[3:5] if geo.segmented else (None, None)
    o_ref, *outs_and_scratch = refs[5 if geo.segmented else 3:]
    lse_ref = outs_and_scratch.pop(0) if save_lse else None
    m_sc, l_sc, acc_sc = outs_and_scratch
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def attend(masked: bool):
        v = v_ref[...]
        s = lax.dot_general(q_ref[...], k_ref[...], NT_DIMS, precision=precision,
                            preferred_element_type=jnp.float32) * geo.sm_scale
        if masked:
            visible = geo.mask(qi, kj, *load_segments(qseg_ref, kvseg_ref))
            s = jnp.where(visible, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))  # [bq, 128]
        alpha = jnp.exp(m_prev - m_next)  # rescales what was accumulated under the old max
        p = jnp.exp(s - m_next[:, :1])
        if masked:  # a block that is fully masked for a row must add nothing, not exp(0) = 1
            p = jnp.where(visible, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        m_sc[...] = m_next
        pv = lax.dot_general(p.astype(v.dtype), v, NN_DIMS, precision=precision,
                             preferred_element_type=jnp.float32)
        acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

    run_block(geo, qi, kj, attend)

    @pl.when(kj == geo.num_kv_blocks - 1)
    def _finish():
        l = l_sc[...]
        l = jnp.where(l == 0.0, 1.0, l)  # a row with no visible key outputs 0, not nan
        o_ref[...] = (acc_sc[...] * (1.0 / l[:, :1])).astype(o_ref.dtype)
        if save_lse:
            lse_ref[...] = m_sc[...] + jnp.log(l)


def forward(q, k, v, q_seg, kv_seg, static: Static, save_lse: bool = True):
    """Pallas forward. q: kernel layout of [B, Sp, H, D]; k/v: of [B, Sp, KVH, D];
    q_seg int32 [B, Sp, 128] and kv_seg int32 [B, 8, Sp] or None.
    Returns o (like q) and lse fp32 [B, H, Sp] (natural log, includes sm_scale), or None when
    not save_lse (no gradient wanted: skips the lane-replicated [B, H, Sp, 128] write)."""
    geo, layout = static.geometry, static.layout
    batch, heads, group = q.shape[0], static.num_heads, static.group
    bq, bkv, dim = geo.block_q, geo.block_kv, layout.head_dim

    def kv_block(b, h, i, j):  # clamped: hidden blocks re-use the last visible one (no DMA)
        return b, idiv(h, group), jnp.minimum(j, geo.last_kv_block(i))

    in_specs = [layout.block_spec(bq, lambda b, h, i, j: (b, h, i)),
                layout.block_spec(bkv, kv_block), layout.block_spec(bkv, kv_block)]
    args = [q, k, v]
    if geo.segmented:
        in_specs += segment_specs(bq, bkv, lambda b, h, i, j: (b, i),
                                  lambda b, h, i, j: (b, kv_block(b, h, i, j)[2]))
        args += [q_seg, kv_seg]
    lse_shape = (batch, heads, geo.padded_len, NUM_LANES)
    flops = 4 * batch * heads * geo.padded_len ** 2 * dim // (2 if geo.causal else 1)
    out_specs = [layout.block_spec(bq, lambda b, h, i, j: (b, h, i))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if save_lse:
        out_specs.append(stats_spec(bq, lambda b, h, i, j: (b, h, i)))
        out_shape.append(jax.ShapeDtypeStruct(lse_shape, jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, static=static, precision=static.precision(q.dtype),
                          save_lse=save_lse),
        grid=(batch, heads, geo.num_q_blocks, geo.num_kv_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                        pltpu.VMEM((bq, dim), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=(
            pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY)),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=flops // (4 * dim),
            bytes_accessed=sum(x.size * x.dtype.itemsize for x in (q, k, v)) * 2),
        interpret=static.interpret,
        name="k2_flash_attention_fwd",
    )(*args)
    return (outs[0], outs[1][..., 0]) if save_lse else (outs[0], None)


# ------------------------------------------------------------------------------ custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, q_seg, kv_seg, static: Static):
    return forward(q, k, v, q_seg, kv_seg, static, save_lse=False)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, static: Static):
    o, lse = forward(q, k, v, q_seg, kv_seg, static)
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _attention_bwd(static: Static, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    dq, dk, dv = flash_attention_bwd.backward(q, k, v, q_seg, kv_seg, o, lse, do, static)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------ public API


def _check_block(name: str, value: int, multiple: int, interpret) -> None:
    if not isinstance(value, int) or value <= 0 or value % multiple:
        mode = "interpret mode" if interpret else "compiled TPU kernels"
        raise ValueError(f"{name}: expected a positive multiple of {multiple} for {mode}, "
                         f"got {value!r}")


def _validate(q, k, v, segment_ids) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name}: expected 4 dims [batch, seq, heads, head_dim], "
                             f"got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: expected dtype bfloat16 or float32, got {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"k: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k: expected [batch={b}, seq={s}, kv_heads, head_dim={d}] like q, "
                         f"got {tuple(k.shape)}")
    if h % k.shape[2]:
        raise ValueError(f"k: kv_heads={k.shape[2]} must divide q heads={h}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, s) or not jnp.issubdtype(segment_ids.dtype,
                                                                    jnp.integer):
            raise ValueError(f"segment_ids: expected int32 [batch={b}, seq={s}], got "
                             f"{segment_ids.dtype}{list(segment_ids.shape)}")


def resolve_interpret(interpret):
    """None -> interpret mode unless the default backend is a TPU."""
    if interpret is None:
        return jax.default_backend() != "tpu"
    return interpret


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                    segment_ids: Optional[jax.Array] = None, sm_scale: Optional[float] = None,
                    block_q: Optional[int] = None, block_kv: Optional[int] = None,
                    interpret: Any = None) -> jax.Array:
    """Fused softmax(q k^T * sm_scale + mask) v, differentiable (Pallas forward and backward).

    Args:
      q: [batch, seq, heads, head_dim], bfloat16 or float32.
      k, v: [batch, seq, kv_heads, head_dim], same dtype; kv_heads divides heads (GQA: query
        head h uses kv head h // (heads // kv_heads)).
      causal: query i sees keys j <= i.
      segment_ids: optional int [batch, seq]; a query sees only keys of its own segment
        (packed documents). None: one segment per row (K2's setting).
      sm_scale: logit scale, default head_dim ** -0.5.
      block_q, block_kv: tile sizes in tokens; None = `default_block_sizes` for the current
        device (or "cpu" in interpret mode; "v5p" when compiling ahead of time off-TPU).
        Multiples of 128 for compiled kernels, of 8 in interpret mode. A sequence that they do
        not divide is padded internally and the padding masked.
      interpret: None = interpret mode unless the default backend is TPU; True/False; or a
        `pltpu.InterpretParams` to simulate TPU memory semantics. Ahead-of-time compiles for
        TPU from a CPU host must pass False.

    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    _validate(q, k, v, segment_ids)
    interpret = resolve_interpret(interpret)
    batch, seq, heads, head_dim = q.shape
    block_q, block_kv = block_sizes_for_call(seq, block_q, block_kv, interpret)
    multiple = INTERPRET_BLOCK_MULTIPLE if interpret else TPU_BLOCK_MULTIPLE
    _check_block("block_q", block_q, multiple, interpret)
    _check_block("block_kv", block_kv, multiple, interpret)
    if sm_scale is None:
        sm_scale = head_dim ** -0.5
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale!r}")

    padded_len = round_up(seq, math.lcm(block_q, block_kv))
    geometry = Geometry(seq_len=seq, padded_len=padded_len, block_q=block_q,
                        block_kv=block_kv, causal=bool(causal),
                        segmented=segment_ids is not None, sm_scale=float(sm_scale))
    layout = Layout.for_head_dim(head_dim)
    static = Static(geometry, layout, heads, k.shape[2], interpret)

    pad = [(0, 0), (0, padded_len - seq), (0, 0), (0, 0)]
    q_k, k_k, v_k = (layout.to_kernel(jnp.pad(x, pad) if padded_len != seq else x)
                     for x in (q, k, v))
    q_seg = kv_seg = None
    if segment_ids is not None:
        # Padded queries take the last real segment so no row is empty; padded keys are masked
        # by position anyway.
        seg = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, padded_len - seq)],
                      mode="edge")
        q_seg = jnp.broadcast_to(seg[:, :, None], (batch, padded_len, NUM_LANES))
        kv_seg = jnp.broadcast_to(seg[:, None, :], (batch, NUM_SUBLANES, padded_len))
    out = _attention(q_k, k_k, v_k, q_seg, kv_seg, static)
    return layout.from_kernel(out, heads)[:, :seq]


def sharded_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh,
                            batch_axes=None, head_axes=None,
                            segment_ids: Optional[jax.Array] = None, **kwargs) -> jax.Array:
    """`flash_attention` on arrays sharded over `mesh`, one kernel call per device.

    A pallas_call is opaque to XLA's SPMD partitioner (it would gather its inputs onto every
    device), so the model must call the kernel per shard under shard_map. Batch may be split
    over `batch_axes` (data/fsdp mesh axes) and heads over `head_axes` (tensor axis; it must
    divide kv_heads too); the sequence must not be sharded (attention needs every key).
    Shapes and kwargs as for `flash_attention`, with global (unsharded) shapes.
    """
    return per_device_attention(functools.partial(flash_attention, **kwargs), q, k, v,
                                mesh=mesh, batch_axes=batch_axes, head_axes=head_axes,
                                segment_ids=segment_ids)
