"""Backward Pallas kernels of flash attention: dq, and dk/dv, from the saved log-sum-exp.

With P = exp(S - lse) recomputed per block (S = q k^T * scale) and delta = rowsum(o * do):
    dv = P^T do,   dP = do v^T,   dS = P * (dP - delta),   dq = scale * dS k,   dk = scale * dS^T q.
Two kernels, so each output is accumulated in VMEM by the grid axis that owns it and nothing
is written twice: the dq kernel walks kv blocks for a fixed q block (like the forward); the
dk/dv kernel walks (query head of the group, q block) for a fixed kv block, so GQA's sum over
the query heads sharing a kv head happens in fp32 scratch, not in an HBM reduction.
No [S, S] array is ever materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels.block_sizes import NUM_LANES, idiv, imod
from k2jax.kernels.flash_tiles import (NN_DIMS, NT_DIMS, Static, load_segments, run_block,
                                       segment_specs, stats_spec)

TN_DIMS = (((0,), (0,)), ((), ()))  # a.T @ b


def _probabilities(q, k, lse, qi, kj, masked, qseg_ref, kvseg_ref, static: Static, precision):
    """Recomputes P [bq, bkv] fp32 for one block from q [bq, D], k [bkv, D], lse [bq, 1]."""
    geo = static.geometry
    s = lax.dot_general(q, k, NT_DIMS, precision=precision,
                        preferred_element_type=jnp.float32) * geo.sm_scale
    p = jnp.exp(s - lse)
    if masked:
        p = jnp.where(geo.mask(qi, kj, *load_segments(qseg_ref, kvseg_ref)), p, 0.0)
    return p


def _dq_kernel(*refs, static: Static, precision):
    """Grid step (b, h, q block i, kv block j): dq_acc [bq, D] += dS k over j."""
    geo = static.geometry
    if geo.segmented:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
         dq_ref, dq_acc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc = refs
        qseg_ref = kvseg_ref = None
    qi, kj = pl.program_id(2), pl.program_id(3)

    @pl.when(kj == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

    def accumulate(masked: bool):
        k = k_ref[...]
        p = _probabilities(q_ref[...], k, lse_ref[...][:, :1], qi, kj, masked, qseg_ref,
                           kvseg_ref, static, precision)
        dp = lax.dot_general(do_ref[...], v_ref[...], NT_DIMS, precision=precision,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...][:, :1])
        dq_acc[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS, precision=precision,
                                       preferred_element_type=jnp.float32)

    run_block(geo, qi, kj, accumulate)

    @pl.when(kj == geo.num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_acc[...] * geo.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, static: Static, precision):
    """Grid step (b, kv head g, kv block j, t = group_head * num_q_blocks + q block i):
    dk_acc, dv_acc [bkv, D] accumulate over every query head of the group and every q block."""
    geo = static.geometry
    if geo.segmented:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
         dk_ref, dv_ref, dk_acc, dv_acc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
        qseg_ref = kvseg_ref = None
    kj, t = pl.program_id(2), pl.program_id(3)
    qi = imod(t, geo.num_q_blocks)

    @pl.when(t == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def accumulate(masked: bool):
        q, do = q_ref[...], do_ref[...]
        p = _probabilities(q, k_ref[...], lse_ref[...][:, :1], qi, kj, masked, qseg_ref,
                           kvseg_ref, static, precision)
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, TN_DIMS, precision=precision,
                                       preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], NT_DIMS, precision=precision,
                             preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...][:, :1])
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, TN_DIMS, precision=precision,
                                       preferred_element_type=jnp.float32)

    # Query blocks made only of padding have a zero output cotangent: skip them as well.
    if geo.padded:
        in_range = qi <= geo.last_q_block()
        pl.when(in_range)(lambda: run_block(geo, qi, kj, accumulate))
    else:
        run_block(geo, qi, kj, accumulate)

    @pl.when(t == static.group * geo.num_q_blocks - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * geo.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _semantics():
    return pltpu.CompilerParams(dimension_semantics=(
        pltpu.PARALLEL, pltpu.PARALLEL, pltpu.PARALLEL, pltpu.ARBITRARY))


def backward(q, k, v, q_seg, kv_seg, o, lse, do, static: Static):
    """Gradients (dq, dk, dv) in the kernel layout and dtypes of (q, k, v).

    q, o, do: kernel layout of [B, Sp, H, D]; k, v: of [B, Sp, KVH, D]; lse fp32 [B, H, Sp];
    q_seg int32 [B, Sp, 128] and kv_seg int32 [B, 8, Sp], or None.
    """
    geo, layout = static.geometry, static.layout
    batch, heads, group = q.shape[0], static.num_heads, static.group
    kv_heads, bq, bkv, dim = static.num_kv_heads, geo.block_q, geo.block_kv, layout.head_dim
    nq, nkv = geo.num_q_blocks, geo.num_kv_blocks
    precision = static.precision(q.dtype)

    # delta_i = sum_d o_id * do_id: a cheap [B, H, Sp] XLA reduction, fused by XLA.
    delta = jnp.sum(layout.rows_per_head(o).astype(jnp.float32)
                    * layout.rows_per_head(do).astype(jnp.float32), axis=-1)
    stats_shape = (batch, heads, geo.padded_len, NUM_LANES)
    lse_b = jnp.broadcast_to(lse[..., None], stats_shape)
    delta_b = jnp.broadcast_to(delta[..., None], stats_shape)
    do = do.astype(q.dtype)
    matmul_flops = 2 * batch * heads * geo.padded_len ** 2 * dim // (2 if geo.causal else 1)
    in_bytes = sum(x.size * x.dtype.itemsize for x in (q, k, v, do, lse_b, delta_b))

    # ---- dq: grid (b, h, i, j); kv blocks hidden by the causal mask are clamped away.
    def kv_block(b, h, i, j):
        return b, idiv(h, group), jnp.minimum(j, geo.last_kv_block(i))

    def q_block(b, h, i, j):
        return b, h, i

    def inputs(q_index, kv_index, q_seg_index, kv_seg_index):
        """Block specs and operands (q, k, v, do, lse, delta[, segment ids]) of one grid."""
        specs = [layout.block_spec(bq, q_index), layout.block_spec(bkv, kv_index),
                 layout.block_spec(bkv, kv_index), layout.block_spec(bq, q_index),
                 stats_spec(bq, q_index), stats_spec(bq, q_index)]
        operands = [q, k, v, do, lse_b, delta_b]
        if geo.segmented:
            specs += segment_specs(bq, bkv, q_seg_index, kv_seg_index)
            operands += [q_seg, kv_seg]
        return specs, operands

    in_specs, args = inputs(q_block, kv_block, lambda b, h, i, j: (b, i),
                            lambda b, h, i, j: (b, kv_block(b, h, i, j)[2]))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, static=static, precision=precision),
        grid=(batch, heads, nq, nkv),
        in_specs=in_specs,
        out_specs=layout.block_spec(bq, q_block),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, dim), jnp.float32)],
        compiler_params=_semantics(),
        cost_estimate=pl.CostEstimate(flops=3 * matmul_flops,
                                      transcendentals=matmul_flops // (2 * dim),
                                      bytes_accessed=in_bytes + q.size * q.dtype.itemsize),
        interpret=static.interpret,
        name="k2_flash_attention_dq",
    )(*args)

    # ---- dk, dv: grid (b, g, j, t) with t = group_head * nq + i. q blocks that cannot see
    # kv block j (before it, causal) or hold only padding are clamped to the nearest useful
    # one, so they cost neither DMA nor compute.
    def q_block_t(b, g, j, t):
        i = jnp.minimum(jnp.maximum(imod(t, nq), geo.first_q_block(j)), geo.last_q_block())
        return b, g * group + idiv(t, nq), i

    def kv_block_t(b, g, j, t):
        return b, g, j

    in_specs, args = inputs(q_block_t, kv_block_t,
                            lambda b, g, j, t: (b, q_block_t(b, g, j, t)[2]),
                            lambda b, g, j, t: (b, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, static=static, precision=precision),
        grid=(batch, kv_heads, nkv, group * nq),
        in_specs=in_specs,
        out_specs=[layout.block_spec(bkv, kv_block_t), layout.block_spec(bkv, kv_block_t)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bkv, dim), jnp.float32),
                        pltpu.VMEM((bkv, dim), jnp.float32)],
        compiler_params=_semantics(),
        cost_estimate=pl.CostEstimate(flops=4 * matmul_flops,
                                      transcendentals=matmul_flops // (2 * dim),
                                      bytes_accessed=in_bytes + 2 * k.size * k.dtype.itemsize),
        interpret=static.interpret,
        name="k2_flash_attention_dkv",
    )(*args)
    return dq, dk, dv
