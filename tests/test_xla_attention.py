"""The model's `xla` attention path (heads-major, blocked over queries, causal blocks skipped)
against the float64 reference, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attention_reference import random_inputs, reference, reference_mask, rel_err
from k2jax.model.attention_core import xla_attention

# (seed, batch, seq, heads, kv_heads, causal, segments, block)
CASES = {
    "mha_causal_4_blocks": (0, 2, 64, 2, 2, True, 0, 16),
    "gqa_causal_segments": (1, 2, 48, 4, 2, True, 3, 16),
    "mqa_causal_one_block": (2, 1, 32, 4, 1, True, 0, 32),
    "mha_full_segments": (3, 1, 64, 2, 2, False, 4, 16),
    "block_not_dividing_seq": (4, 1, 40, 2, 1, True, 2, 16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    seed, batch, seq, heads, kv_heads, causal, segments, block = CASES[name]
    q, k, v, do, segment_ids = random_inputs(seed, batch, seq, heads, kv_heads, 32, jnp.float32,
                                             segments)

    @jax.jit
    def run(q, k, v, do):
        out, pullback = jax.vjp(lambda q, k, v: xla_attention(
            q, k, v, causal=causal, segment_ids_BxS=segment_ids, block=block), q, k, v)
        return (out, *pullback(do))

    want = reference(q, k, v, do, reference_mask(seq, causal, segment_ids), 32 ** -0.5)
    for got, ref, label in zip(run(q, k, v, do), want, ("out", "dq", "dk", "dv")):
        assert rel_err(got, ref) < 1e-5, (name, label)


@pytest.mark.slow  # quick group time (~3 s)
def test_causal_boundary_is_sharp():
    """A reference whose causal diagonal moves by one must not match (so the test can fail)."""
    q, k, v, do, _ = random_inputs(5, 1, 64, 2, 2, 32, jnp.float32, 0)
    got = xla_attention(q, k, v, causal=True, block=16)
    shifted = reference(q, k, v, do, reference_mask(64, True, None, diagonal=1), 32 ** -0.5)[0]
    assert rel_err(got, shifted) > 1e-2
