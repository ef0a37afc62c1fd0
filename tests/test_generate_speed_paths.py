"""The CPU speed paths of generation and scoring give the same numbers as the plain ones:
decode from per-layer weights vs the scanned stack, and scoring at 4 bucket sizes per octave vs
powers of two; the bucket sizes themselves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_models import state_dict_numpy, tiny_llama
from k2jax.generate import Generator
from k2jax.generate.batching import bucket, fine_bucket
from k2jax.generate.scoring import Scorer


def k2jax_weights():
    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    model = tiny_llama()
    config = model_config_from_hf(model.config.to_dict(), param_dtype="float32",
                                  compute_dtype="float32", remat="none", attention="xla")
    params = params_from_hf(state_dict_numpy(model).__getitem__, config)
    return jax.tree.map(jnp.asarray, params), config


@pytest.mark.parametrize("n, want", [(1, 16), (16, 16), (17, 24), (33, 40), (64, 64), (65, 80),
                                     (111, 112), (120, 128), (129, 160), (200, 224), (257, 320)])
def test_fine_bucket(n, want):
    assert fine_bucket(n, 16) == want
    assert n <= want <= max(16, bucket(n, 16)) and want - n < max(16, n // 4 + 8)


@pytest.mark.slow  # four compiles of generation and scoring: ~30 s idle
def test_per_layer_decode_and_fine_buckets_match_the_plain_paths():
    params, config = k2jax_weights()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 19, 11)]
    runs = [Generator(params, config, per_layer_weights=flag).generate(prompts, 6)
            for flag in (False, True)]
    assert [g.tokens for g in runs[0]] == [g.tokens for g in runs[1]]
    pairs = [(rng.integers(3, 250, c).tolist(), rng.integers(3, 250, 3).tolist())
             for c in (30, 7, 40)]  # window 42 -> 48 (fine) or 64 (power of two)
    plain = Scorer(params, config, fine_buckets=False).score(pairs)
    fine = Scorer(params, config, fine_buckets=True).score(pairs)
    np.testing.assert_allclose([p for p, _ in fine], [p for p, _ in plain], rtol=1e-5)
    assert [g for _, g in fine] == [g for _, g in plain]
