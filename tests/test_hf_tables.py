"""The Hugging Face tables themselves (k2jax/hf/name_map.py, k2jax/hf/config_json.py): shapes,
both transforms, the on-disk order, agreement with the model's parameters, config.json both
ways. Host numpy only, plus one jax.eval_shape of a tiny model: seconds."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.hf import config_json, name_map

MHA = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=4, num_kv_heads=4)
GQA = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=3,
                  num_heads=8, num_kv_heads=2, head_dim=16)  # N*D = 128 != E: catches mixups

# Written out by hand from transformers' LlamaForCausalLM (HF) and k2jax/model (k2jax).
# V=250, E=64, M=96; MHA: N=K=4, D=16; GQA: N=8, K=2, D=16.
SHAPES = {  # path -> (MHA k2jax, MHA HF, GQA k2jax, GQA HF)
    ("embed_tokens",): ((250, 64), (250, 64), (250, 64), (250, 64)),
    ("final_norm", "scale"): ((64,), (64,), (64,), (64,)),
    ("lm_head",): ((64, 250), (250, 64), (64, 250), (250, 64)),
    ("input_norm", "scale"): ((64,), (64,), (64,), (64,)),
    ("post_attention_norm", "scale"): ((64,), (64,), (64,), (64,)),
    ("attention", "q_proj"): ((64, 4, 16), (64, 64), (64, 8, 16), (128, 64)),
    ("attention", "k_proj"): ((64, 4, 16), (64, 64), (64, 2, 16), (32, 64)),
    ("attention", "v_proj"): ((64, 4, 16), (64, 64), (64, 2, 16), (32, 64)),
    ("attention", "o_proj"): ((4, 16, 64), (64, 64), (8, 16, 64), (64, 128)),
    ("mlp", "gate_proj"): ((64, 96), (96, 64), (64, 96), (96, 64)),
    ("mlp", "up_proj"): ((64, 96), (96, 64), (64, 96), (96, 64)),
    ("mlp", "down_proj"): ((96, 64), (64, 96), (96, 64), (64, 96)),
}


def k2jax_to_hf(array, mapping: name_map.TensorMapping, config: ModelConfig):
    """The inverse of name_map.hf_to_k2jax: the permutation, then the merge of each group of
    axes (the converters do the same per layer slice, on TensorStore views)."""
    assert tuple(array.shape) == name_map.k2jax_shape(mapping, config), mapping.hf_name
    return array.transpose(mapping.order).reshape(name_map.hf_shape(mapping, config))


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_tensor_kind_is_in_the_table_once():
    assert sorted(m.path for m in name_map.TABLE) == sorted(SHAPES)
    assert len({m.hf_name for m in name_map.TABLE}) == len(name_map.TABLE)
    for m in name_map.TABLE:  # the permutation is one: every k2jax axis exactly once
        assert sorted(m.order) == list(range(len(m.axes))), m.hf_name


@pytest.mark.parametrize("config,column", [(MHA, 0), (GQA, 2)], ids=["mha", "gqa"])
def test_shapes_derive_from_the_table(config, column):
    for m in name_map.TABLE:
        assert name_map.k2jax_shape(m, config) == SHAPES[m.path][column], m.hf_name
        assert name_map.hf_shape(m, config) == SHAPES[m.path][column + 1], m.hf_name


@pytest.mark.parametrize("config", [MHA, GQA], ids=["mha", "gqa"])
def test_forward_then_inverse_is_the_identity(config):
    for seed, m in enumerate(name_map.TABLE):
        hf = _random(name_map.hf_shape(m, config), seed)
        k2 = name_map.hf_to_k2jax(hf, m, config)
        assert k2.shape == name_map.k2jax_shape(m, config)
        np.testing.assert_array_equal(k2jax_to_hf(k2, m, config), hf)
        k2 = _random(name_map.k2jax_shape(m, config), seed + 100)
        np.testing.assert_array_equal(
            name_map.hf_to_k2jax(k2jax_to_hf(k2, m, config), m, config), k2)


@pytest.mark.parametrize("config", [MHA, GQA], ids=["mha", "gqa"])
def test_values_land_where_hugging_face_puts_them(config):
    """Element by element, written out: HF linear weights are [out, in], q/k/v rows are
    head-major (row n*D + d), o_proj columns likewise."""
    d = config.resolved_head_dim
    for seed, m in enumerate(name_map.TABLE):
        hf = _random(name_map.hf_shape(m, config), seed)
        k2 = name_map.hf_to_k2jax(hf, m, config)
        name = m.path[-1]
        if name in ("q_proj", "k_proj", "v_proj"):  # k2 [E, N, D]
            assert k2[5, 1, 3] == hf[1 * d + 3, 5]
        elif name == "o_proj":  # k2 [N, D, E]
            assert k2[1, 3, 5] == hf[5, 1 * d + 3]
        elif name in ("gate_proj", "up_proj", "down_proj", "lm_head"):  # k2 [in, out]
            np.testing.assert_array_equal(k2, hf.T)
        else:
            np.testing.assert_array_equal(k2, hf)


@pytest.mark.parametrize("config", [MHA, GQA], ids=["mha", "gqa"])
def test_disk_order_of_a_stacked_leaf_is_the_hugging_face_byte_order(config):
    """The converter stores a stacked leaf [L, *k2jax] with its axes permuted by hf_order:
    those bytes must be the HF tensors of every layer, one after the other."""
    for seed, m in enumerate(m for m in name_map.TABLE if m.per_layer):
        leaf = _random((config.num_layers,) + name_map.k2jax_shape(m, config), seed)
        on_disk = np.ascontiguousarray(leaf.transpose(name_map.hf_order(m, stacked=True)))
        per_layer = [k2jax_to_hf(leaf[i], m, config) for i in range(config.num_layers)]
        np.testing.assert_array_equal(on_disk.ravel(), np.concatenate([a.ravel()
                                                                       for a in per_layer]))


@pytest.mark.parametrize("config", [MHA, GQA], ids=["mha", "gqa"])
def test_table_agrees_with_the_models_parameters(config):
    """Every parameter the model creates is in the table, with the table's shape and the
    table's k2jax axes as its logical axis names (the model owns its layout)."""
    from k2jax.model import K2Model

    boxed = jax.eval_shape(lambda key: K2Model(config).init(key, jnp.zeros((1, 2), jnp.int32)),
                           jax.random.key(0))["params"]
    specs = nn.get_partition_spec(boxed)
    leaves = {tuple(k.key for k in path): leaf for path, leaf
              in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]}
    table = {(("layers",) + m.path) if m.per_layer else m.path: m
             for m in name_map.mappings(config)}
    assert set(leaves) == set(table)
    for path, m in table.items():
        layers = (config.num_layers,) if m.per_layer else ()
        assert leaves[path].shape == layers + name_map.k2jax_shape(m, config), path
        spec = specs
        for key in path:
            spec = spec[key]
        assert tuple(spec) == (("layers",) if m.per_layer else ()) + m.axes, path


def test_tied_embeddings_have_no_lm_head():
    tied = dataclasses.replace(GQA, tie_word_embeddings=True)
    assert [m.path for m in name_map.mappings(tied)] == [
        m.path for m in name_map.TABLE if m.path != ("lm_head",)]


@pytest.mark.parametrize("config", [MHA, GQA], ids=["mha", "gqa"])
def test_config_json_written_then_read_is_the_same_model(config):
    written = config_json.hf_config_dict(config, torch_dtype="bf16")
    assert written["torch_dtype"] == "bfloat16"
    assert written["num_hidden_layers"] == 3 and written["head_dim"] == 16
    read = config_json.model_config_from_hf(written)
    for field in config_json.ARCHITECTURE_FIELDS + ("max_position_embeddings", "eos_token_id",
                                                     "pad_token_id", "bos_token_id"):
        assert getattr(read, field) == getattr(config, field), field


def test_config_json_transformers_defaults_and_rope_parameters():
    minimal = {"vocab_size": 250, "hidden_size": 64, "intermediate_size": 96,
               "num_hidden_layers": 2, "num_attention_heads": 4,
               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    config = config_json.model_config_from_hf(minimal)
    assert config.num_kv_heads == 4 and config.rms_norm_eps == 1e-6
    assert config.rope_theta == 500000.0 and config.max_position_embeddings == 2048


@pytest.mark.parametrize("change,message", [
    (dict(vocab_size=None), "DIR/config.json: missing field 'vocab_size'"),
    (dict(model_type="mistral"), "DIR/config.json: model_type 'mistral' is not 'llama'"),
    (dict(hidden_act="gelu"), "DIR/config.json: hidden_act 'gelu' is not supported"),
    (dict(architectures=["GPT2LMHeadModel"]), "DIR/config.json: architectures"),
    (dict(num_key_value_heads=3), "DIR/config.json: config key 'model.num_kv_heads'"),
])
def test_config_json_errors_name_the_file_once(change, message):
    hf = {**config_json.hf_config_dict(MHA), **change}
    hf = {k: v for k, v in hf.items() if v is not None or k not in change}
    with pytest.raises(UserError) as err:
        config_json.model_config_from_hf(hf, "DIR/config.json")
    assert str(err.value).startswith(message)
    assert str(err.value).count("config.json") == 1


def test_eval_refuses_what_the_model_does_not_compute():
    """eval-loss / compare-hf read config.json through the same checks as the converter (they
    used to accept, e.g., a gelu model and compute it as silu)."""
    from k2jax.hf.config_json import model_config_from_hf

    with pytest.raises(UserError, match="hidden_act"):
        model_config_from_hf({**config_json.hf_config_dict(MHA), "hidden_act": "gelu"})
