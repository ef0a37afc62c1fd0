"""model.mlp_activation relu and gelu: the 2-matrix MLP (MaxText's base model of 2023 and its
GPT-3, for the step-time calibration): its parameters, its output and the FLOP count that MFU
uses."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from k2jax.config import ModelConfig
from k2jax.errors import ConfigError
from k2jax.hf.name_map import mappings
from k2jax.model.layers import Mlp
from k2jax.model.param_count import count_params
from k2jax.train.flops import matmul_params

TINY = ModelConfig(vocab_size=96, hidden_size=16, intermediate_size=40, num_layers=2,
                   num_heads=2, num_kv_heads=2, param_dtype="float32", compute_dtype="float32",
                   remat="none", attention="xla")


def _tanh_gelu(h):  # GELU's tanh form, written out
    return 0.5 * h * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (h + 0.044715 * h ** 3)))


@pytest.mark.parametrize("activation, act", [("relu", lambda h: jnp.maximum(h, 0.0)),
                                             ("gelu", _tanh_gelu)])
def test_two_matrix_mlp_is_down_of_act_of_up(activation, act):
    cfg = dataclasses.replace(TINY, mlp_activation=activation)
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    params = Mlp(cfg).init(jax.random.key(0), x)["params"]
    assert set(params) == {"up_proj", "down_proj"}
    up, down = (jax.tree.leaves(params[k])[0] for k in ("up_proj", "down_proj"))
    expected = act(x @ up) @ down
    assert jnp.allclose(Mlp(cfg).apply({"params": params}, x), expected, atol=1e-5)
    assert matmul_params(cfg) == matmul_params(dataclasses.replace(TINY, mlp_activation="relu"))


def test_relu_counts_two_matrices_and_swiglu_three():
    relu = dataclasses.replace(TINY, mlp_activation="relu", tie_word_embeddings=True)
    assert count_params(TINY) - count_params(relu) == 2 * 16 * 40 + 96 * 16  # gate, lm_head
    # matmul weights: all parameters but the two norm scales per layer and the final norm
    # (the tied embedding is used once, as the output projection)
    assert matmul_params(relu) == count_params(relu) - (2 * 2 + 1) * 16


def test_relu_has_no_hugging_face_layout():
    with pytest.raises(ConfigError, match="model.mlp_activation"):
        mappings(dataclasses.replace(TINY, mlp_activation="relu"))
