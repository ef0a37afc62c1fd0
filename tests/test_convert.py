"""`k2jax convert`: round trips bit-exact per tensor, exported directories load in transformers
with k2jax's logits, training checkpoints export their parameters only."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_fixtures import (hf_config, hf_state, read_safetensors_dir, state_bits,
                              tiny_hf_model, write_hf_dir)
from k2jax.checkpoint.params_io import read_model_config, restore_params
from k2jax.cli import main
from k2jax.model import K2Model
from k2jax.model.param_count import abstract_params

LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model()


def abstract_target(config):
    """ShapeDtypeStructs with a sharding, as train.init_from builds them."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.tree.map(lambda x: x, abstract_params(config))
    import flax.linen as nn
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        nn.meta.unbox(shapes))


def restore(directory):
    config = read_model_config(str(directory))
    return config, restore_params(str(directory), abstract_target(config))


CASES = {  # source dtype, format, shards
    "fp32-safetensors-sharded": ("fp32", "safetensors", 3),
    "bf16-bin-sharded": ("bf16", "bin", 2),
    "fp16-safetensors-single": ("fp16", "safetensors", 1),
    "bf16-safetensors-single": ("bf16", "safetensors", 1),
    "fp16-bin-single": ("fp16", "bin", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(case, model, tmp_path):
    dtype, fmt, shards = CASES[case]
    state = hf_state(model, dtype)
    src = write_hf_dir(tmp_path / "hf", state, hf_config(model), fmt, shards)
    assert main(["convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "w"),
                 "--no-progress"]) == 0
    config, params = restore(tmp_path / "w")
    stored = {"bf16": jnp.bfloat16}.get(dtype, jnp.float32)  # fp16 is stored exactly in fp32
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(stored)}
    assert config.scan_layers and params["layers"]["attention"]["q_proj"].shape[0] == 2

    assert main(["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "w"), "--out",
                 str(tmp_path / "back"), "--dtype", dtype, "--shard-size", "40KB",
                 "--no-progress"]) == 0
    back, source = read_safetensors_dir(tmp_path / "back"), state_bits(state)
    assert sorted(back) == sorted(source)
    for name in source:
        assert back[name].dtype == source[name].dtype, name
        np.testing.assert_array_equal(back[name], source[name], err_msg=name)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # --shard-size 40KB made several shards


def test_export_loads_in_transformers_with_k2jax_logits(model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model), "safetensors", 2)
    assert main(["convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "w"),
                 "--no-progress"]) == 0
    config, params = restore(tmp_path / "w")
    config = dataclasses.replace(config, compute_dtype="float32", attention="xla", remat="none")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16), dtype=np.int32)
    ours = np.asarray(K2Model(config).apply({"params": params}, jnp.asarray(tokens)))

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    assert main(["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "w"), "--out",
                 str(tmp_path / "export"), "--dtype", "fp32", "--tokenizer",
                 str(tokenizer_dir), "--no-progress"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    with torch.no_grad():
        theirs = exported(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        original = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= LOGIT_ATOL
    # Same weights bit for bit (the round-trip tests); only the attention kernel differs
    # (from_pretrained picks sdpa, the source model was built eager).
    assert np.abs(theirs - original).max() <= 1e-5
    assert (tmp_path / "export" / "tokenizer_config.json").is_file()
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == model.config.eos_token_id
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["torch_dtype"] == "float32"


def test_training_checkpoint_exports_parameters_only(model, tmp_path, capsys):
    from k2jax.checkpoint.manager import RunCheckpoints
    from k2jax.config import TrainConfig

    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    assert main(["convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "w"),
                 "--no-progress"]) == 0
    config, params = restore(tmp_path / "w")
    state = {"step": jnp.int32(7), "params": params,
             "opt_state": {"mu": jax.tree.map(lambda p: p + 1.0, params)}}
    run = RunCheckpoints(str(tmp_path / "run"), TrainConfig())
    run.save(7, state, {"model": dataclasses.asdict(config)}, {"step": 7})
    run.wait()
    run.close()
    assert main(["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "run/checkpoints/7"),
                 "--out", str(tmp_path / "export"), "--dtype", "fp32", "--no-progress"]) == 0
    back, source = read_safetensors_dir(tmp_path / "export"), state_bits(hf_state(model))
    assert sorted(back) == sorted(source)
    for name in source:
        np.testing.assert_array_equal(back[name], source[name], err_msg=name)
    # The run directory itself, as eval-loss and generate take it: its latest complete step.
    assert main(["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "run"),
                 "--out", str(tmp_path / "export-run"), "--dtype", "fp32", "--no-progress"]) == 0
    assert f"-> {tmp_path}/run/checkpoints/7 (latest complete step of 1)" in capsys.readouterr().err
    from_run = read_safetensors_dir(tmp_path / "export-run")
    for name in source:
        np.testing.assert_array_equal(from_run[name], source[name], err_msg=name)
