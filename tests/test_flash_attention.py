"""Pallas flash attention (interpret mode on CPU) against a float64 NumPy reference.

Forward and all three gradients on fresh random inputs, causal and not, with and without
segment ids, MHA and GQA, sequences that the blocks do and do not divide. Mutation tests prove
the comparison is sharp enough to catch an off-by-one mask. Run:
    JAX_PLATFORMS=cpu python -m pytest tests/test_flash_attention.py
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from k2jax.kernels import BlockSizes, default_block_sizes, flash_attention
from k2jax.kernels.block_sizes import Geometry
from attention_reference import random_inputs, reference, reference_mask, rel_err

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


# ------------------------------------------------------------------------------ helpers


def kernel_outputs(q, k, v, do, **kwargs):
    """(o, dq, dk, dv) from the Pallas kernels, via jax.vjp under jit."""

    @jax.jit
    def run(q, k, v, do, segment_ids):
        o, pullback = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, segment_ids=segment_ids, **kwargs), q, k, v)
        return (o, *pullback(do))

    segment_ids = kwargs.pop("segment_ids", None)
    return run(q, k, v, do, segment_ids)


# --------------------------------------------------------------------------- correctness

# (seed, batch, seq, heads, kv_heads, head_dim, dtype, causal, segments, block_q, block_kv)
CASES = {
    "mha_causal": (0, 1, 64, 2, 2, 64, jnp.float32, True, 0, 16, 32),
    "mha_causal_seed1": (1, 1, 64, 2, 2, 64, jnp.float32, True, 0, 32, 16),
    "gqa_causal_segments_pad": (2, 2, 50, 4, 2, 64, jnp.float32, True, 3, 16, 32),
    "mha_full_segments": (3, 1, 64, 2, 2, 64, jnp.float32, False, 4, 32, 16),
    "gqa_full_pad": (4, 1, 40, 4, 1, 64, jnp.float32, False, 0, 16, 16),
    # Padding spans a whole q block (24..31) and a whole kv block (24..31): both are skipped.
    "causal_pad_whole_blocks": (5, 1, 20, 2, 1, 64, jnp.float32, True, 0, 8, 8),
    "gqa_causal_bf16": (6, 1, 64, 4, 2, 64, jnp.bfloat16, True, 0, 16, 32),
    "segments_bf16": (7, 1, 48, 2, 2, 64, jnp.bfloat16, False, 3, 16, 16),
    "head_dim_128": (8, 1, 32, 2, 1, 128, jnp.float32, True, 0, 16, 16),
    "head_dim_256": (9, 1, 16, 2, 2, 256, jnp.float32, True, 2, 8, 8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    (seed, batch, seq, heads, kv_heads, head_dim, dtype, causal, segments, block_q,
     block_kv) = CASES[name]
    q, k, v, do, segment_ids = random_inputs(seed, batch, seq, heads, kv_heads, head_dim,
                                             dtype, segments)
    got = kernel_outputs(q, k, v, do, causal=causal, segment_ids=segment_ids,
                         block_q=block_q, block_kv=block_kv)
    want = reference(q, k, v, do, reference_mask(seq, causal, segment_ids), head_dim ** -0.5)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    errors = {n: rel_err(g, w) for n, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.slow  # interpret-mode kernel at default blocks: ~6 s idle
def test_custom_scale_and_default_blocks():
    q, k, v, do, _ = random_inputs(10, 1, 24, 2, 2, 64, jnp.float32, 0)
    got = kernel_outputs(q, k, v, do, causal=True, sm_scale=0.3)
    want = reference(q, k, v, do, reference_mask(24, True, None), 0.3)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_tpu_interpret_params_simulates_memory_semantics():
    """InterpretParams simulates VMEM scratch and DMAs; uninitialised memory reads as nan, so
    an accumulator used before its init would show up here."""
    q, k, v, do, seg = random_inputs(11, 1, 32, 2, 1, 64, jnp.float32, 2)
    o = flash_attention(q, k, v, segment_ids=seg, block_q=16, block_kv=16,
                        interpret=pltpu.InterpretParams())
    want = reference(q, k, v, do, reference_mask(32, True, seg), 64 ** -0.5)[0]
    assert rel_err(o, want) <= 1e-5


# ------------------------------------------------------------- the comparison is sharp


def test_off_by_one_causal_mask_is_detected():
    """A reference whose causal boundary moves by one diagonal must NOT match the kernel, so
    the tolerance above can tell a correct mask from an off-by-one one."""
    q, k, v, do, _ = random_inputs(12, 1, 64, 2, 2, 64, jnp.float32, 0)
    got = kernel_outputs(q, k, v, do, causal=True, block_q=16, block_kv=16)
    for diagonal in (-1, 1):
        mask = reference_mask(64, True, None, diagonal)
        mask[:, 0, 0] = True  # keep row 0 non-empty when the diagonal is excluded
        mutated = reference(q, k, v, do, mask, 0.125)
        assert min(rel_err(g, w) for g, w in zip(got, mutated)) > 1e-3


def test_shifted_segment_boundary_is_detected():
    q, k, v, do, seg = random_inputs(13, 1, 48, 2, 2, 64, jnp.float32, 3)
    got = kernel_outputs(q, k, v, do, causal=False, segment_ids=seg, block_q=16, block_kv=16)
    shifted = np.asarray(seg).copy()
    boundary = int(np.argmax(np.diff(shifted[0]) != 0)) + 1  # first token of the 2nd segment
    shifted[0, boundary] = shifted[0, boundary - 1]
    mutated = reference(q, k, v, do, reference_mask(48, False, shifted), 0.125)
    assert rel_err(got[0], mutated[0]) > 1e-3


@pytest.mark.parametrize("mutation", ["skip_diagonal_block", "unmasked_diagonal_block"])
def test_wrong_block_decisions_are_detected(monkeypatch, mutation):
    """Sabotage the kernel's block decisions and check the reference comparison fails: a
    skipped visible block, or a diagonal block computed without its mask, must be caught."""
    if mutation == "skip_diagonal_block":
        monkeypatch.setattr(Geometry, "block_runs",
                            lambda self, i, j: j < self.last_kv_block(i))
    else:
        monkeypatch.setattr(Geometry, "block_needs_mask", lambda self, i, j: jnp.bool_(False))
    q, k, v, do, _ = random_inputs(14, 1, 64, 2, 2, 64, jnp.float32, 0)
    got = kernel_outputs(q, k, v, do, causal=True, block_q=16, block_kv=16)
    want = reference(q, k, v, do, reference_mask(64, True, None), 0.125)
    assert rel_err(got[0], want[0]) > 1e-3


@pytest.mark.slow  # quick group time (~3 s; the float64 references stay quick)
def test_causal_skipping_matches_brute_force():
    """Block-level decisions (skip, mask, DMA clamp) against a brute-force scan of the mask,
    over block shapes with bq <, =, > bkv and padded sequences."""
    for seq, bq, bkv, causal in itertools.product((16, 37, 64), (8, 16, 32), (8, 16, 32),
                                                  (True, False)):
        padded = -(-seq // np.lcm(bq, bkv)) * np.lcm(bq, bkv)
        geo = Geometry(seq, int(padded), bq, bkv, causal, False, 1.0)
        full = np.zeros((padded, padded), bool)
        full[:, :seq] = True
        if causal:
            full &= np.tril(np.ones((padded, padded), bool))
        for i, j in itertools.product(range(geo.num_q_blocks), range(geo.num_kv_blocks)):
            block = full[i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
            runs = bool(geo.block_runs(i, j))
            assert runs == block.any(), (seq, bq, bkv, causal, i, j)
            if runs:
                assert bool(geo.block_needs_mask(i, j)) == (not block.all())
                np.testing.assert_array_equal(np.asarray(geo.mask(i, j)), block)
            # Clamped DMA indices always name a block that is needed, so a hidden step
            # re-uses a tile already in VMEM instead of fetching one.
            assert geo.block_runs(i, min(j, int(geo.last_kv_block(i))))
            if j * bkv < seq:  # dk/dv kernel: q block index clamped for kv block j
                clamped = min(max(i, int(geo.first_q_block(j))), geo.last_q_block())
                assert geo.block_runs(clamped, j) and clamped * bq < seq


# ---------------------------------------------------------------------- errors and API


@pytest.mark.parametrize("kwargs, q_shape, kv_shape, word", [
    ({}, (1, 16, 2, 64), (1, 16, 3, 64), "k:"),                 # kv_heads does not divide
    ({}, (1, 16, 2, 64), (1, 8, 2, 64), "k:"),                  # seq differs
    ({}, (16, 2, 64), (1, 16, 2, 64), "q:"),                    # 3-D q
    ({"block_q": 12}, (1, 16, 2, 64), (1, 16, 2, 64), "block_q"),
    ({"block_kv": 0}, (1, 16, 2, 64), (1, 16, 2, 64), "block_kv"),
    ({"sm_scale": -1.0}, (1, 16, 2, 64), (1, 16, 2, 64), "sm_scale"),
    ({"segment_ids": jnp.zeros((1, 8), jnp.int32)}, (1, 16, 2, 64), (1, 16, 2, 64),
     "segment_ids"),
])
def test_user_errors_name_the_argument(kwargs, q_shape, kv_shape, word):
    q = jnp.ones(q_shape, jnp.float32)
    k = jnp.ones(kv_shape, jnp.float32)
    with pytest.raises(ValueError, match=word):
        flash_attention(q, k, k, **kwargs)


def test_compiled_blocks_must_be_lane_aligned():
    q = jnp.ones((1, 256, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="block_kv.*multiple of 128"):
        flash_attention(q, q, q, block_q=128, block_kv=64, interpret=False)


def test_dtype_errors():
    q = jnp.ones((1, 16, 2, 64), jnp.float16)
    with pytest.raises(ValueError, match="q: expected dtype"):
        flash_attention(q, q, q)
    q32 = jnp.ones((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="k:"):
        flash_attention(q32, q32.astype(jnp.bfloat16), q32.astype(jnp.bfloat16))


def test_default_block_sizes():
    assert default_block_sizes("v5p", 2048) == BlockSizes(512, 512)
    assert default_block_sizes("TPU v5 lite", 2048) == default_block_sizes("v5e", 2048)
    assert default_block_sizes("TPU v6 lite", 4096) == BlockSizes(1024, 512)
    assert default_block_sizes("TPU v4", 2048) == BlockSizes(512, 512)
    assert default_block_sizes("v5p", 200) == BlockSizes(256, 256)  # capped at the sequence
    assert default_block_sizes("cpu", 20) == BlockSizes(24, 24)
    for generation in ("v4", "v5e", "v5p", "v6e"):
        sizes = default_block_sizes(generation, 8192)
        assert sizes.block_q % 128 == 0 and sizes.block_kv % 128 == 0
    with pytest.raises(ValueError, match="device_kind_or_generation"):
        default_block_sizes("v9x", 2048)
    with pytest.raises(ValueError, match="seq_len"):
        default_block_sizes("v5p", 0)


@pytest.mark.slow  # simulated devices + interpret mode: ~7 s idle
def test_sharded_wrapper_matches_unsharded():
    """shard_map plumbing (with and without segment ids) on a 1x1 CPU mesh; the multi-chip
    case is compiled for TPU in test_flash_attention_tpu_compile.py."""
    from k2jax.kernels import sharded_flash_attention

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    q, k, v, _, seg = random_inputs(15, 2, 32, 2, 1, 64, jnp.float32, 2)
    for segment_ids in (None, seg):
        want = flash_attention(q, k, v, segment_ids=segment_ids, block_q=16, block_kv=16)
        got = sharded_flash_attention(q, k, v, mesh=mesh, batch_axes="data", head_axes="tensor",
                                      segment_ids=segment_ids, block_q=16, block_kv=16)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
