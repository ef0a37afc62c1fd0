"""The GPU attention path (`model.attention: cudnn`, k2jax/kernels/gpu_attention.py) on this CPU:
its XLA fallback (the same jax call with implementation="xla") against the model's own `xla`
attention and the float64 reference, forward and gradients, with causal masks and packed
documents (segment ids) as the model passes them; the one-line refusals off a GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_reference import random_inputs, reference, reference_mask, rel_err
from k2jax.config import load_config
from k2jax.errors import ConfigError
from k2jax.kernels import gpu_attention as gpu
from k2jax.model import attention_core
from k2jax.model.attention_core import dot_product_attention, xla_attention

TINY = "configs/tiny.yaml"

# (seed, batch, seq, heads, kv_heads, causal, segments)
CASES = {
    "gqa_causal_segments": (1, 2, 48, 4, 2, True, 3),
    "mqa_causal_segments": (2, 1, 32, 4, 1, True, 2),
    "mha_full_segments": (3, 1, 64, 2, 2, False, 4),
}


def vjp_of(fn, q, k, v, do):
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(do))


@pytest.mark.parametrize("name", list(CASES))
def test_xla_fallback_matches_model_attention_and_reference(name):
    seed, batch, seq, heads, kv_heads, causal, segments = CASES[name]
    q, k, v, do, segment_ids = random_inputs(seed, batch, seq, heads, kv_heads, 32, jnp.float32,
                                             segments)
    new = jax.jit(lambda *a: vjp_of(functools.partial(
        gpu.gpu_attention, causal=causal, segment_ids_BxS=segment_ids, implementation="xla"),
        *a))(q, k, v, do)
    old = jax.jit(lambda *a: vjp_of(functools.partial(
        xla_attention, causal=causal, segment_ids_BxS=segment_ids, block=16), *a))(q, k, v, do)
    want = reference(q, k, v, do, reference_mask(seq, causal, segment_ids), 32 ** -0.5)
    for got, ours, ref, label in zip(new, old, want, ("out", "dq", "dk", "dv")):
        assert rel_err(got, ref) < 1e-5, (name, label)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ours), atol=2e-6, err_msg=label)


def test_xla_fallback_in_bf16_agrees_with_model_attention():
    """bf16 inputs as cuDNN gets them on a GPU: both paths within bf16 rounding of fp64."""
    q, k, v, do, segment_ids = random_inputs(5, 2, 64, 4, 2, 64, jnp.bfloat16, 3)
    new = jax.jit(lambda *a: vjp_of(functools.partial(
        gpu.gpu_attention, segment_ids_BxS=segment_ids, implementation="xla"), *a))(q, k, v, do)
    old = jax.jit(lambda *a: vjp_of(functools.partial(
        xla_attention, segment_ids_BxS=segment_ids), *a))(q, k, v, do)
    want = reference(q, k, v, do, reference_mask(64, True, segment_ids), 64 ** -0.5)
    for got, ours, ref in zip(new, old, want):
        assert got.dtype == jnp.bfloat16
        assert rel_err(got, ref) < 2e-2 and rel_err(ours, ref) < 2e-2


@pytest.mark.slow  # two model compiles with gradients: ~30 s at load
def test_model_with_gpu_path_equals_model_with_xla(monkeypatch):
    """The whole model (scanned layers, packed documents) through the `cudnn` dispatch, cuDNN
    swapped for jax's XLA implementation: logits and parameter gradients equal the `xla` model's."""
    from k2jax.model.transformer import K2Model

    monkeypatch.setattr(gpu, "gpu_attention",
                        functools.partial(gpu.gpu_attention, implementation="xla"))
    monkeypatch.setattr(gpu, "check_cudnn_inputs", lambda q, backend: None)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32032, (2, 32)), jnp.int32)
    segment_ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], 8, axis=1).repeat(2, 0), jnp.int32)
    results = []
    for impl in ("xla", "cudnn"):
        cfg = load_config(TINY, [f"model.attention={impl}"]).model
        model = K2Model(cfg)
        params = model.init(jax.random.PRNGKey(0), tokens)

        def loss(p):
            logits = model.apply(p, tokens, segment_ids_BxS=segment_ids)
            return jnp.mean(logits ** 2), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((logits, grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), atol=2e-5)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_cudnn_on_cpu_is_refused_in_one_line():
    q = jnp.zeros((1, 16, 2, 32), jnp.bfloat16)
    with pytest.raises(ConfigError, match="model.attention.*needs an NVIDIA GPU.*'cpu'") as err:
        dot_product_attention(q, q, q, impl="cudnn")
    assert "\n" not in str(err.value)


def test_on_a_gpu_auto_picks_cudnn_for_bf16_and_tpu_kernels_are_refused(monkeypatch):
    monkeypatch.setattr(attention_core.jax, "default_backend", lambda: "gpu")
    bf16, fp32 = jnp.zeros((1, 16, 2, 128), jnp.bfloat16), jnp.zeros((1, 16, 2, 128))
    assert attention_core.resolve_attention_impl("auto", bf16) == "cudnn"
    assert attention_core.resolve_attention_impl("auto", fp32) == "xla"  # fp32 evaluation
    for kernel in ("pallas", "splash"):
        with pytest.raises(ConfigError, match=f"model.attention.*'{kernel}' is a TPU Pallas"):
            attention_core.resolve_attention_impl(kernel, bf16)
    with pytest.raises(ConfigError, match="bfloat16/float16.*float32"):
        gpu.check_cudnn_inputs(fp32, "gpu")
    gpu.check_cudnn_inputs(bf16, "gpu")  # takes K2's shape and dtype


def test_config_accepts_cudnn():
    assert load_config(TINY, ["model.attention=cudnn"]).model.attention == "cudnn"
