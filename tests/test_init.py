"""Initialisation: Megatron's (K2's) normal(initializer_range) everywhere, o_proj and down_proj
at initializer_range / sqrt(2 * num_layers) with model.scaled_output_init, norm scales 1."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import ModelConfig
from k2jax.model import K2Model

NUM_LAYERS = 3
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


def small_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=250, hidden_size=128, intermediate_size=256, num_layers=NUM_LAYERS,
                num_heads=4, num_kv_heads=2, max_position_embeddings=16, param_dtype="float32",
                compute_dtype="float32", remat="none", attention="xla", initializer_range=0.02)
    base.update(overrides)
    return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def init_params(scan_layers: bool, scaled: bool) -> dict:
    """A freshly initialised model's params (jitted: one compile instead of op-by-op)."""
    model = K2Model(small_config(scan_layers=scan_layers, scaled_output_init=scaled))
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])
    return nn.meta.unbox(init(jax.random.key(3)))


def expected_std(name: str, scaled: bool) -> float:
    """Megatron: init_method_normal(0.02) for every matrix (the embedding and the untied output
    layer too), scaled_init_method_normal for the two output projections of each layer."""
    if scaled and name in OUTPUT_PROJECTIONS:
        return 0.02 / math.sqrt(2 * NUM_LAYERS)
    return 0.02


def leaves(params: dict) -> list[tuple[str, np.ndarray]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(jax.tree_util.keystr(path), np.asarray(value)) for path, value in flat]


@pytest.mark.parametrize("scan_layers,scaled", [
    (False, True),
    pytest.param(True, True, marks=pytest.mark.slow),  # each case a full init: ~6 s idle
    pytest.param(True, False, marks=pytest.mark.slow)])
def test_every_parameter_has_megatrons_std(scan_layers, scaled):
    params = init_params(scan_layers, scaled)
    names = [path for path, _ in leaves(params)]
    assert sum("o_proj" in n for n in names) == (1 if scan_layers else NUM_LAYERS)
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)
    for path, value in leaves(params):
        name = path.split("'")[-2]  # the innermost key, e.g. "o_proj"
        if name == "scale":  # RMSNorm
            assert np.all(value == 1.0), path
            continue
        samples = value.astype(np.float64).ravel()
        assert samples.size >= 8192, path  # enough for a tight bound below
        # The sample std of n normal draws has a relative standard error of 1 / sqrt(2 n):
        # 6 of them is a bound that a wrong std (a factor sqrt(6) here) cannot meet.
        tolerance = 6 / math.sqrt(2 * samples.size)
        std = expected_std(name, scaled)
        assert abs(samples.std() / std - 1) < tolerance, (path, samples.std(), std)
        assert abs(samples.mean()) < 6 * std / math.sqrt(samples.size), path


def test_scanned_layers_are_independent_draws():
    params = init_params(True, True)  # cached: scan_layers, scaled
    o_proj = np.asarray(params["layers"]["attention"]["o_proj"])
    assert o_proj.shape[0] == NUM_LAYERS
    for i in range(1, NUM_LAYERS):
        assert not np.allclose(o_proj[0], o_proj[i])
