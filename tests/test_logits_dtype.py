"""model.logits_dtype (issue 26): K2's bf16 output layer. Logits rounded to bf16 before the fp32
loss, dlogits rounded to bf16 in the backward; the train step's loss sees it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import ModelConfig, load_config
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.model.transformer import rounded_logits

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=2, max_position_embeddings=16,
                     param_dtype="float32", compute_dtype="float32", remat="none",
                     attention="xla", initializer_range=0.5)  # logits of a few units


def bf16_exact(x) -> bool:
    x = np.asarray(x, np.float32)
    return np.array_equal(x, x.astype(jnp.bfloat16).astype(np.float32))


def test_rounded_logits_rounds_forward_and_backward():
    x = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 5
    g = jax.random.normal(jax.random.key(1), (2, 3, 7))
    y, vjp = jax.vjp(lambda v: rounded_logits(v, "bfloat16"), x)
    assert y.dtype == jnp.float32 and bf16_exact(y) and not bf16_exact(x)
    (dx,) = vjp(g)
    assert dx.dtype == jnp.float32 and bf16_exact(dx) and not bf16_exact(g)
    np.testing.assert_array_equal(dx, g.astype(jnp.bfloat16).astype(jnp.float32))


def test_presets_k2_bf16_elsewhere_fp32():
    assert load_config("k2-65b").model.logits_dtype == "bfloat16"
    assert load_config("k2-stage2").model.logits_dtype == "bfloat16"
    assert load_config("tiny").model.logits_dtype == "float32"
    assert ModelConfig().logits_dtype == "float32"


@pytest.mark.slow  # six small compiles: ~40 s on a shared 2-core machine
def test_model_logits_and_their_gradient_follow_logits_dtype():
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones((2, 16), jnp.float32)
    params = nn.meta.unbox(K2Model(CONFIG).init(jax.random.key(3), tokens)["params"])
    rounded = dataclasses.replace(CONFIG, logits_dtype="bfloat16")
    exact_logits = jax.jit(K2Model(CONFIG).apply)({"params": params}, tokens)
    bf16_logits = jax.jit(K2Model(rounded).apply)({"params": params}, tokens)
    assert bf16_exact(bf16_logits) and not bf16_exact(exact_logits)
    np.testing.assert_array_equal(bf16_logits,
                                  exact_logits.astype(jnp.bfloat16).astype(jnp.float32))

    def loss(config, p):
        total, count = masked_next_token_loss(K2Model(config).apply({"params": p}, tokens),
                                              tokens, mask)
        return total / count

    exact_loss = float(jax.jit(lambda p: loss(CONFIG, p))(params))
    bf16_loss = float(jax.jit(lambda p: loss(rounded, p))(params))
    ref_total, ref_count = masked_next_token_loss(
        exact_logits.astype(jnp.bfloat16).astype(jnp.float32), tokens, mask)
    assert bf16_loss == pytest.approx(float(ref_total / ref_count), abs=1e-6)
    assert abs(bf16_loss - exact_loss) > 1e-6
    # The lm_head's gradient is x^T dlogits: with rounded dlogits it moves too.
    g_exact = jax.jit(jax.grad(lambda p: loss(CONFIG, p)))(params)["lm_head"]
    g_bf16 = jax.jit(jax.grad(lambda p: loss(rounded, p)))(params)["lm_head"]
    assert not np.allclose(g_exact, g_bf16, rtol=0, atol=1e-9)
    assert np.linalg.norm(g_bf16 - g_exact) < 0.05 * np.linalg.norm(g_exact)  # a rounding


@pytest.mark.slow  # a train-step loss compile: ~12 s
def test_the_train_steps_loss_rounds_the_logits():
    """train/step_loss.py (the train step's and eval-loss's loss) under logits_dtype bf16 is the
    loss of the bf16-rounded logits."""
    from k2jax.config import Config, DataConfig, MeshConfig
    from k2jax.sharding.mesh import build_mesh
    from k2jax.train.step import make_loss_and_gradients

    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones((2, 16), jnp.float32)
    params = nn.meta.unbox(K2Model(CONFIG).init(jax.random.key(5), tokens)["params"])
    config = Config(model=dataclasses.replace(CONFIG, logits_dtype="bfloat16"),
                    data=DataConfig(seq_len=16, global_batch_size=2, micro_batch_size=1),
                    mesh=MeshConfig()).validate()
    loss = jax.jit(make_loss_and_gradients(config, build_mesh(config.mesh)))(
        params, {"tokens": tokens, "loss_mask": mask})[0]
    logits = jax.jit(K2Model(CONFIG).apply)({"params": params}, tokens)
    total, count = masked_next_token_loss(logits.astype(jnp.bfloat16).astype(jnp.float32),
                                          tokens, mask)
    assert float(loss) == pytest.approx(float(total / count), rel=1e-6)


@pytest.mark.slow  # ~5 s: a decode compile
def test_decode_logits_are_rounded_like_the_forward():
    """generate and lm-eval's generate_until decode through the KV cache: the same bf16 logits
    as the model's forward (K2's scoring), for every position of a prefill."""
    from k2jax.model.kv_cache import empty_cache, forward_with_cache

    config = dataclasses.replace(CONFIG, logits_dtype="bfloat16", scan_layers=True)
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 3, config.vocab_size)
    params = nn.unbox(K2Model(config).init(jax.random.key(3), tokens)["params"])
    full = K2Model(config).apply({"params": params}, tokens)
    cache = empty_cache(config, batch=2, slots=8)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cached, _ = forward_with_cache(params, config, tokens, jnp.ones((2, 6), bool), positions,
                                   cache, jnp.int32(0))
    assert bf16_exact(cached) and bf16_exact(full)
    np.testing.assert_allclose(cached, full, atol=0.05)  # same bf16 grid; fp32 sums may differ
