"""KV-cache generation against transformers' `generate`, sampling filters, compile counts, and
sharded (8 simulated devices, fsdp x tensor) against unsharded."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import state_dict_numpy, tiny_llama
from k2jax.errors import UserError
from k2jax.generate import Generator, SamplingParams
from k2jax.generate.sampling import filter_logits
from train_utils import REPO, subprocess_env

EOS = 2
PROMPT_LENGTHS = (5, 11, 3, 17, 9)


def k2jax_weights(model):
    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    config = model_config_from_hf(model.config.to_dict(), param_dtype="float32",
                                  compute_dtype="float32", remat="none", attention="xla")
    params = params_from_hf(state_dict_numpy(model).__getitem__, config)
    return jax.tree.map(jnp.asarray, params), config


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, n).tolist() for n in lengths]


def hf_greedy(model, prompts, max_new_tokens):
    """transformers' generate on the left-padded batch, each row cut after its first EOS."""
    length = max(map(len, prompts))
    ids = torch.tensor([[0] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=EOS)
    rows = []
    for row in out[:, length:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.slow  # two generation compiles and transformers' generate: ~12 s each idle
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
def test_greedy_equals_transformers_generate(num_kv_heads):
    model = tiny_llama(num_kv_heads=num_kv_heads, max_positions=128)
    params, config = k2jax_weights(model)
    prompts = prompts_of(PROMPT_LENGTHS)
    results = Generator(params, config).generate(prompts, 24, eos_ids=[EOS])
    expected = hf_greedy(model, prompts, 24)
    assert [r.tokens for r in results] == expected
    assert [r.finish_reason for r in results] == ["eos" if e[-1] == EOS else "length"
                                                 for e in expected]
    assert any(r.finish_reason == "eos" for r in results)  # the EOS path is exercised


@pytest.mark.slow  # compiles several bucket shapes
def test_decode_compiles_once_per_bucket():
    model = tiny_llama(num_kv_heads=2, max_positions=128)
    params, config = k2jax_weights(model)
    generator = Generator(params, config)
    for lengths in ((3,), (5,), (16, 2, 7), (4, 9, 1)):  # prompt bucket 16; 3 rows -> 4
        generator.generate(prompts_of(lengths), 10)
    assert generator.compiles() == {"prefill": 2, "decode": 2}  # rows 1 and 4 (one bucket each)
    generator.generate(prompts_of((20, 3, 4)), 10)  # prompt bucket 32, 4 rows
    assert generator.compiles() == {"prefill": 3, "decode": 3}


@pytest.mark.slow  # compiles several bucket shapes
def test_sampling_settings():
    model = tiny_llama(num_kv_heads=2, max_positions=128)
    params, config = k2jax_weights(model)
    generator = Generator(params, config)
    prompts = prompts_of((4, 8))
    greedy = generator.generate(prompts, 12)
    top1 = generator.generate(prompts, 12, SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]
    hot = SamplingParams(temperature=2.0, seed=5)
    first, again = generator.generate(prompts, 12, hot), generator.generate(prompts, 12, hot)
    other = generator.generate(prompts, 12, SamplingParams(temperature=2.0, seed=6))
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert [g.tokens for g in first] != [g.tokens for g in other]
    assert [g.tokens for g in first] != [g.tokens for g in greedy]


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.4, 0.1]]))
    kept = lambda k, p: np.isfinite(np.asarray(filter_logits(logits, jnp.int32(k),
                                                              jnp.float32(p))))
    assert kept(2, 1.0).tolist() == [[True, False, True, False], [True, True, True, False]]  # tie
    # nucleus: the fewest most likely tokens reaching p (ties at the boundary kept)
    assert kept(0, 0.75).tolist() == [[True, False, True, False], [True, True, True, False]]
    assert kept(0, 0.1).tolist() == [[True, False, False, False], [False, False, True, False]]
    assert kept(0, 1.0).all()


def test_stop_callback_and_bad_input():
    model = tiny_llama(num_kv_heads=2, max_positions=32)
    params, config = k2jax_weights(model)
    generator = Generator(params, config, decode_chunk=4)
    prompts = prompts_of((4, 6))
    results = generator.generate(prompts, 12, stop=lambda i, tokens: i == 0 and len(tokens) >= 3)
    assert results[0].finish_reason == "stop" and len(results[0].tokens) == 4  # one chunk
    assert results[1].finish_reason == "length" and len(results[1].tokens) == 12
    with pytest.raises(UserError, match=r"prompt 1: 30 tokens \+ 12 new ones exceed the "
                                        r"model's context of 32"):
        generator.generate([[5], [7] * 30], 12)
    with pytest.raises(UserError, match="prompt 0: token id 250 is outside the model's "
                                        "vocabulary of 250"):
        generator.generate([[5, 250]], 4)
    with pytest.raises(UserError, match="top_p must be in"):
        generator.generate([[5]], 4, SamplingParams(temperature=1.0, top_p=0.0))


# ---------------------------------------------------------------------------------------------
# Sharded == unsharded: the worker runs in a subprocess with 8 simulated CPU devices.


def _sharded_worker() -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from k2jax.config import MeshConfig
    from k2jax.weights.on_mesh import sharded_abstract_params
    from k2jax.sharding.mesh import build_mesh

    results = {}
    for name, kv in (("mha", 4), ("gqa", 2)):
        model = tiny_llama(num_kv_heads=kv, max_positions=128)
        params, config = k2jax_weights(model)
        prompts = prompts_of(PROMPT_LENGTHS, seed=1)
        sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
        single = Generator(params, config)
        mesh_config = MeshConfig(fsdp=4, tensor=2)
        mesh = build_mesh(mesh_config)
        _, shardings = sharded_abstract_params(config, mesh, mesh_config.rules)
        placed = jax.device_put(params, shardings)
        sharded = Generator(placed, config, mesh=mesh, rules=mesh_config.rules)
        results[name] = {
            kind: [[r.tokens for r in g.generate(prompts, 16, s, eos_ids=[EOS])]
                   for g in (single, sharded)]
            for kind, s in (("greedy", SamplingParams()), ("sampled", sampling))}
        results[name]["param_shards"] = len(placed["layers"]["mlp"]["up_proj"]
                                            .addressable_shards[0].data.reshape(-1))
        results[name]["param_size"] = int(placed["layers"]["mlp"]["up_proj"].size)
    print(json.dumps(results))


@pytest.mark.slow
def test_sharded_generation_equals_single_device():
    env = subprocess_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        for kind in ("greedy", "sampled"):
            single, sharded = result[kind]
            assert single == sharded, (name, kind)
        assert result["param_shards"] * 8 == result["param_size"]  # fsdp 4 x tensor 2


if __name__ == "__main__":
    _sharded_worker()
