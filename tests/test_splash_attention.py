"""`model.attention: splash` (jax's Pallas splash attention, interpret mode on CPU) against the
float64 NumPy reference, its dispatch (auto picks it on TPU) and the sharded train step.

    JAX_PLATFORMS=cpu python -m pytest tests/test_splash_attention.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import load_config
from k2jax.errors import ConfigError
from k2jax.kernels import flash_attention, sharded_splash_attention, splash_attention
from k2jax.model import attention_core
from attention_reference import random_inputs, reference, reference_mask, rel_err
from train_utils import TINY, small_config

# name: (seed, batch, seq, heads, kv_heads, head_dim, dtype, segments, causal, block_q, block_kv)
CASES = {
    "mha_fp32": (1, 1, 256, 2, 2, 128, jnp.float32, None, True, 128, 128),
    "gqa_bf16_segments_ragged": (2, 2, 200, 4, 2, 128, jnp.bfloat16, 3, True, 128, 128),
    "mqa_fp32_ragged_unequal_blocks": (3, 1, 300, 4, 1, 64, jnp.float32, None, True, 256, 128),
    "full_fp32": (4, 1, 256, 2, 1, 128, jnp.float32, 2, False, 128, 128),
}
# Measured 2026-11-30 (2-core CPU): at most 7.3e-7 in fp32 and 5.9e-3 in bf16.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def splash_and_grads(q, k, v, do, segment_ids, causal, block_q, block_kv):
    out, pullback = jax.vjp(lambda q, k, v: splash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, block_q=block_q,
        block_kv=block_kv), q, k, v)
    return (out, *pullback(do))


# Quick group time (~3 s each): two of the four shapes run in the slow group.
SLOW_CASES = {"gqa_bf16_segments_ragged", "mqa_fp32_ragged_unequal_blocks"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_CASES else name
    for name in CASES])
def test_matches_float64_reference(name):
    seed, batch, seq, heads, kv_heads, head_dim, dtype, segments, causal, bq, bkv = CASES[name]
    q, k, v, do, segment_ids = random_inputs(seed, batch, seq, heads, kv_heads, head_dim,
                                             dtype, segments)
    got = splash_and_grads(q, k, v, do, segment_ids, causal, bq, bkv)
    want = reference(q, k, v, do, reference_mask(seq, causal, segment_ids), head_dim ** -0.5)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    for label, x, ref in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(x, ref) <= TOLERANCE[dtype], (name, label, rel_err(x, ref))
    if causal:  # the comparison is sharp: a causal diagonal one token off does not pass
        shifted = reference(q, k, v, do, reference_mask(seq, causal, segment_ids, diagonal=1),
                            head_dim ** -0.5)
        assert rel_err(got[0], shifted[0]) > 10 * TOLERANCE[dtype]


def test_equals_the_own_kernel():
    """Both kernels compute the same function (fp32, GQA, segments): swapping them in the
    model changes nothing but rounding."""
    q, k, v, _, segment_ids = random_inputs(5, 1, 256, 4, 2, 128, jnp.float32, 2)
    ours = flash_attention(q, k, v, segment_ids=segment_ids, block_q=128, block_kv=128)
    theirs = splash_attention(q, k, v, segment_ids=segment_ids, block_q=128, block_kv=128)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=2e-6)


@pytest.mark.parametrize("kwargs, seq, word", [
    (dict(block_q=64), 256, "block_q"),                # not a whole 128-lane tile
    (dict(block_kv=200), 256, "block_kv"),
    (dict(causal=False, block_q=128, block_kv=128), 200, "divide seq"),  # padding needs causal
    (dict(sm_scale=0.0), 128, "sm_scale"),
])
def test_user_errors_name_the_argument(kwargs, seq, word):
    q = jnp.zeros((1, seq, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match=word):
        splash_attention(q, q, q, **kwargs)


def test_auto_picks_splash_on_tpu_and_xla_elsewhere(monkeypatch):
    assert attention_core.resolve_attention_impl("auto") == "xla"  # this CPU host
    monkeypatch.setattr(attention_core.jax, "default_backend", lambda: "tpu")
    assert attention_core.resolve_attention_impl("auto") == "splash"
    assert attention_core.resolve_attention_impl("pallas") == "pallas"


def test_config_accepts_splash_and_names_the_key_otherwise():
    assert load_config(TINY, ["model.attention=splash"]).model.attention == "splash"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(TINY, ["model.attention=flash"])


@pytest.mark.slow  # simulated devices + interpret mode: ~10 s idle
def test_sharded_wrapper_matches_unsharded():
    """shard_map plumbing (with and without segment ids) on a 1x1 CPU mesh; the multi-chip
    case is compiled for TPU in test_splash_attention_tpu_compile.py."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))
    q, k, v, _, seg = random_inputs(6, 2, 128, 2, 1, 64, jnp.float32, 2)
    for segment_ids in (None, seg):
        want = splash_attention(q, k, v, segment_ids=segment_ids)
        got = sharded_splash_attention(q, k, v, mesh=mesh, batch_axes="data",
                                       head_axes="tensor", segment_ids=segment_ids)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow  # two train-step compiles and a simulated kernel: 1-2 min on 2 busy cores
def test_train_step_with_splash_equals_xla():
    """One sharded train step (the model's dispatch runs splash per device under shard_map, on
    a one-device CPU mesh): loss, gradient norm and updated parameters as with `xla`."""
    from test_train import one_step

    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 128, (8, 16)), jnp.int32),
             "loss_mask": jnp.ones((8, 16), jnp.float32)}
    xla_state, xla = one_step(small_config("unused", "model.attention=xla"), batch)
    splash_state, splash = one_step(small_config("unused", "model.attention=splash"), batch)
    assert splash["loss"] == pytest.approx(xla["loss"], rel=1e-6)
    assert splash["grad_norm"] == pytest.approx(xla["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(xla_state.params), jax.tree.leaves(splash_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)


def load_benchmark():
    import importlib.util

    from train_utils import REPO

    spec = importlib.util.spec_from_file_location("attention_benchmark",
                                                  REPO / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_verdict_needs_the_own_kernel_as_fast_at_every_shape():
    pick_auto = load_benchmark().pick_auto
    assert pick_auto({2048: {"pallas": 1.0, "splash": 1.0},
                      8192: {"pallas": 3.0, "splash": 3.5}}) == "pallas"
    assert pick_auto({2048: {"pallas": 0.9, "splash": 1.0},
                      8192: {"pallas": 3.6, "splash": 3.5}}) == "splash"
    assert pick_auto({2048: {"splash": 1.0}}) is None  # the own kernel failed: no verdict
    assert pick_auto({}) is None


@pytest.mark.slow  # both kernels in interpret mode at a small shape: ~30 s on 2 cores
def test_benchmark_on_cpu_says_a_tpu_is_needed(capsys):
    load_benchmark().main([])
    out = capsys.readouterr().out
    assert "timing needs a TPU" in out and "auto should pick" not in out
    assert "splash (jax)" in out and "pallas (k2jax)" in out  # the correctness rows ran


@pytest.mark.parametrize("backward_blocks, fused", [((128, 256, 256, 128), False),
                                                    ((128, 128, 256, 128), True)])
def test_backward_blocks_and_fused_backward_match_the_reference(backward_blocks, fused):
    """MaxText's recipes size splash's dq and dk/dv kernels apart from the forward (e.g. 2048
    forward, 512 for keys) and fuse dq into the dk/dv kernel: the same function, other blocks."""
    q, k, v, do, segment_ids = random_inputs(6, 1, 256, 4, 2, 128, jnp.float32, 2)
    out, pullback = jax.vjp(lambda q, k, v: splash_attention(
        q, k, v, segment_ids=segment_ids, block_q=256, block_kv=128,
        backward_blocks=backward_blocks, fused_backward=fused), q, k, v)
    want = reference(q, k, v, do, reference_mask(256, True, segment_ids), 128 ** -0.5)
    for label, x, ref in zip(("out", "dq", "dk", "dv"), (out, *pullback(do)), want):
        assert rel_err(x, ref) <= TOLERANCE[jnp.float32], (label, rel_err(x, ref))


def test_backward_blocks_config_names_the_key():
    config = load_config(TINY, ["model.attention_backward_blocks=[512,256,512,256]",
                                "model.attention_fused_backward=true"]).model
    from k2jax.model.layers import splash_backward

    assert splash_backward(config) == {"backward_blocks": (512, 256, 512, 256),
                                       "fused_backward": True}
    with pytest.raises(ConfigError, match="model.attention_backward_blocks"):
        load_config(TINY, ["model.attention_backward_blocks=[512,100,512,256]"])
