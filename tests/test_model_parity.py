"""k2jax's model against Hugging Face transformers' LlamaForCausalLM, in fp32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import state_dict_numpy, tiny_llama
from k2jax.hf.config_json import model_config_from_hf
from k2jax.eval.rope_frequencies import round_hf_rope_frequencies
from k2jax.hf.name_map import params_from_hf
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.model import rope as rope_module

LOGIT_ATOL = 1e-4
LOSS_ATOL = 1e-5


def k2jax_config(hf_model, **overrides):
    base = dict(param_dtype="float32", compute_dtype="float32", attention="xla", remat="none")
    base.update(overrides)
    return model_config_from_hf(hf_model.config.to_dict(), **base)


def k2jax_logits(hf_model, tokens, **overrides):
    config = k2jax_config(hf_model, **overrides)
    params = params_from_hf(state_dict_numpy(hf_model).__getitem__, config)
    return np.asarray(K2Model(config).apply({"params": params}, jnp.asarray(tokens)))


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def hf_loss(hf_model, tokens) -> float:
    """HF's own loss: the mean over every shifted label, i.e. K2's loss with an all-ones mask."""
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long),
                        labels=torch.as_tensor(tokens, dtype=torch.long)).loss.item()


def random_tokens(vocab, batch=2, seq=24, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)


CASES = {
    "mha_theta1e4": dict(num_kv_heads=4, rope_theta=1e4),
    "gqa_theta5e5": dict(num_kv_heads=2, rope_theta=5e5),
    "mqa": dict(num_kv_heads=1, rope_theta=1e4),
}


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_loss_match_transformers(case, scan_layers):
    hf_model = tiny_llama(vocab_size=250, **CASES[case])  # 250: not a multiple of 128
    tokens = random_tokens(250)
    ours = k2jax_logits(hf_model, tokens, scan_layers=scan_layers)
    theirs = hf_logits(hf_model, tokens)
    assert np.abs(ours - theirs).max() <= LOGIT_ATOL
    assert np.abs(theirs).max() > 1.0  # the logits are far from trivial

    loss_sum, count = masked_next_token_loss(jnp.asarray(ours), jnp.asarray(tokens),
                                             jnp.ones(tokens.shape, jnp.float32))
    assert count == tokens.shape[0] * (tokens.shape[1] - 1)
    assert abs(float(loss_sum / count) - hf_loss(hf_model, tokens)) <= LOSS_ATOL


def k2jax_loss(logits, tokens) -> float:
    loss_sum, count = masked_next_token_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                             jnp.ones(tokens.shape, jnp.float32))
    return float(loss_sum / count)


@pytest.mark.slow  # two stacks at bf16 RoPE: ~8 s idle
def test_bf16_rope_frequencies_equal_transformers_with_rounded_inv_freq():
    """model.rope_freq_dtype=bfloat16 (K2 as trained) is transformers with its inv_freq buffer
    rounded to bf16 and cast back to fp32, and clearly not stock transformers: at rope_theta
    5e5 (K2-Chat's) and 64 positions the rounding moves logits by ~4e-2, far above 1e-5."""
    tokens = random_tokens(250, seq=64)
    stock = tiny_llama(rope_theta=5e5, max_positions=64)
    stock_logits, stock_loss = hf_logits(stock, tokens), hf_loss(stock, tokens)
    rounded = round_hf_rope_frequencies(tiny_llama(rope_theta=5e5, max_positions=64), "bfloat16")
    rounded_logits, rounded_loss = hf_logits(rounded, tokens), hf_loss(rounded, tokens)

    ours = k2jax_logits(stock, tokens, rope_freq_dtype="bfloat16")
    assert np.abs(ours - rounded_logits).max() <= 1e-5
    assert abs(k2jax_loss(ours, tokens) - rounded_loss) <= LOSS_ATOL
    assert np.abs(ours - stock_logits).max() > 100 * LOGIT_ATOL
    assert abs(k2jax_loss(ours, tokens) - stock_loss) > 10 * LOSS_ATOL
    # float32 (the default) stays transformers' own.
    assert np.abs(k2jax_logits(stock, tokens) - stock_logits).max() <= 1e-5


def test_masked_loss_equals_hand_computation_on_hf_logits():
    hf_model = tiny_llama(vocab_size=250, num_kv_heads=2)
    tokens = random_tokens(250, batch=3, seq=16, seed=7)
    logits = hf_logits(hf_model, tokens).astype(np.float64)
    mask = (np.random.default_rng(3).random(tokens.shape) > 0.3).astype(np.float32)

    total, count = 0.0, 0.0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - 1):  # the last position never counts
            row = logits[b, i]
            log_prob = row[tokens[b, i + 1]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
            total += -log_prob * mask[b, i]
            count += mask[b, i]
    loss_sum, mask_sum = masked_next_token_loss(jnp.asarray(logits, jnp.float32),
                                                jnp.asarray(tokens), jnp.asarray(mask))
    assert float(mask_sum) == count
    assert abs(float(loss_sum / mask_sum) - total / count) <= LOSS_ATOL


# The parity check must be able to fail: each wrong variant below is caught by it.

def interleaved_rope(x, cos, sin):
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    c, s = cos[:, :, None, :half], sin[:, :, None, :half]
    return jnp.stack([x_even * c - x_odd * s, x_odd * c + x_even * s], -1).reshape(x.shape)


def test_parity_check_catches_interleaved_rope(monkeypatch):
    hf_model = tiny_llama()
    tokens = random_tokens(250)
    monkeypatch.setattr(rope_module, "apply_rope", interleaved_rope)
    import k2jax.model.layers as layers
    monkeypatch.setattr(layers, "apply_rope", interleaved_rope)
    assert np.abs(k2jax_logits(hf_model, tokens) - hf_logits(hf_model, tokens)).max() > LOGIT_ATOL


def test_parity_check_catches_wrong_norm_eps():
    hf_model = tiny_llama()
    tokens = random_tokens(250)
    ours = k2jax_logits(hf_model, tokens, rms_norm_eps=1e-6)
    assert np.abs(ours - hf_logits(hf_model, tokens)).max() > LOGIT_ATOL


def test_parity_check_catches_tied_output_projection():
    hf_model = tiny_llama()
    tokens = random_tokens(250)
    config = k2jax_config(hf_model)
    params = params_from_hf(state_dict_numpy(hf_model).__getitem__, config)
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    del params["lm_head"]
    ours = np.asarray(K2Model(tied).apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(ours - hf_logits(hf_model, tokens)).max() > LOGIT_ATOL


def test_bf16_compute_stays_close_to_fp32():
    hf_model = tiny_llama()
    tokens = random_tokens(250)
    fp32 = k2jax_logits(hf_model, tokens)
    bf16 = k2jax_logits(hf_model, tokens, compute_dtype="bfloat16")
    assert np.abs(fp32 - bf16).max() / np.abs(fp32).max() < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "save_dots", "save_dots_no_batch", "save_qkv_out"])
def test_remat_policies_give_identical_gradients(remat):
    hf_model = tiny_llama(num_layers=2)
    tokens = jnp.asarray(random_tokens(250, seq=16))
    mask = jnp.ones(tokens.shape, jnp.float32)

    def grads(policy):
        config = k2jax_config(hf_model, remat=policy)
        params = params_from_hf(state_dict_numpy(hf_model).__getitem__, config)

        def loss(p):
            total, count = masked_next_token_loss(K2Model(config).apply({"params": p}, tokens),
                                                  tokens, mask)
            return total / count

        return jax.grad(loss)(params)

    for a, b in zip(jax.tree.leaves(grads("none")), jax.tree.leaves(grads(remat))):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()  # recompute order: fp32 rounding


@pytest.mark.slow
def test_pallas_attention_in_the_model_matches_xla():
    """The fused kernel (interpret mode on CPU): logits and gradients as the XLA path."""
    hf_model = tiny_llama(vocab_size=250, num_kv_heads=2)
    tokens = jnp.asarray(random_tokens(250, batch=1, seq=32))
    mask = jnp.ones(tokens.shape, jnp.float32)

    def logits_and_grads(impl):
        config = k2jax_config(hf_model, attention=impl, attention_block_q=16,
                              attention_block_kv=16)
        params = params_from_hf(state_dict_numpy(hf_model).__getitem__, config)
        model = K2Model(config)

        def loss(p):
            total, count = masked_next_token_loss(model.apply({"params": p}, tokens), tokens, mask)
            return total / count

        return model.apply({"params": params}, tokens), jax.grad(loss)(params)

    xla_logits, xla_grads = logits_and_grads("xla")
    pallas_logits, pallas_grads = logits_and_grads("pallas")
    assert np.abs(np.asarray(xla_logits - pallas_logits)).max() <= LOGIT_ATOL
    for a, b in zip(jax.tree.leaves(xla_grads), jax.tree.leaves(pallas_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
