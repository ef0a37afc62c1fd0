"""The single table between Hugging Face LlamaForCausalLM tensors and k2jax parameters.

Both conversion directions, the parity tests and eval-loss use this table and nothing else.
K2 uses Hugging Face's rotate-half RoPE, so q/k weights need NO permutation: only transposes
and head reshapes. Layouts (HF linear weights are [out, in]):

  identity   : same array (embedding [V, E], norm scales [E])
  transpose  : [out, in] -> [in, out]                 (MLP, lm_head)
  heads_in   : [N*D, E] -> [E, N, D]                  (q, k, v projections)
  heads_out  : [E, N*D] -> [N, D, E]                  (output projection)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np

from k2jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_name: str  # "{i}" stands for the layer index in per-layer tensors
    path: tuple[str, ...]  # path in the k2jax params tree (under "layers" if per_layer)
    layout: str
    per_layer: bool


TABLE: tuple[TensorMapping, ...] = (
    TensorMapping("model.embed_tokens.weight", ("embed_tokens",), "identity", False),
    TensorMapping("model.norm.weight", ("final_norm", "scale"), "identity", False),
    TensorMapping("lm_head.weight", ("lm_head",), "transpose", False),
    TensorMapping("model.layers.{i}.input_layernorm.weight", ("input_norm", "scale"),
                  "identity", True),
    TensorMapping("model.layers.{i}.post_attention_layernorm.weight",
                  ("post_attention_norm", "scale"), "identity", True),
    TensorMapping("model.layers.{i}.self_attn.q_proj.weight", ("attention", "q_proj"),
                  "heads_in", True),
    TensorMapping("model.layers.{i}.self_attn.k_proj.weight", ("attention", "k_proj"),
                  "heads_in", True),
    TensorMapping("model.layers.{i}.self_attn.v_proj.weight", ("attention", "v_proj"),
                  "heads_in", True),
    TensorMapping("model.layers.{i}.self_attn.o_proj.weight", ("attention", "o_proj"),
                  "heads_out", True),
    TensorMapping("model.layers.{i}.mlp.gate_proj.weight", ("mlp", "gate_proj"), "transpose", True),
    TensorMapping("model.layers.{i}.mlp.up_proj.weight", ("mlp", "up_proj"), "transpose", True),
    TensorMapping("model.layers.{i}.mlp.down_proj.weight", ("mlp", "down_proj"), "transpose",
                  True),
)


def mappings(config: ModelConfig) -> list[TensorMapping]:
    """The table entries that exist for this config (no lm_head when embeddings are tied)."""
    return [m for m in TABLE if not (config.tie_word_embeddings and m.path == ("lm_head",))]


def hf_names(config: ModelConfig) -> Iterator[tuple[str, TensorMapping, Optional[int]]]:
    """Every Hugging Face tensor name the model has: (name, mapping, layer index or None)."""
    for mapping in mappings(config):
        if mapping.per_layer:
            for layer in range(config.num_layers):
                yield mapping.hf_name.format(i=layer), mapping, layer
        else:
            yield mapping.hf_name, mapping, None


def k2jax_shape(mapping: TensorMapping, config: ModelConfig) -> tuple[int, ...]:
    """Shape of one (unstacked) k2jax parameter."""
    e, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    name = mapping.path[-1]
    return {
        "embed_tokens": (v, e), "scale": (e,), "lm_head": (e, v),
        "q_proj": (e, n, d), "k_proj": (e, k, d), "v_proj": (e, k, d), "o_proj": (n, d, e),
        "gate_proj": (e, m), "up_proj": (e, m), "down_proj": (m, e),
    }[name]


def hf_shape(mapping: TensorMapping, config: ModelConfig) -> tuple[int, ...]:
    shape = k2jax_shape(mapping, config)
    if mapping.layout == "identity":
        return shape
    if mapping.layout == "transpose":
        return shape[::-1]
    if mapping.layout == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if mapping.layout == "heads_out":
        return (shape[2], shape[0] * shape[1])
    raise ValueError(mapping.layout)


def hf_to_k2jax(array, mapping: TensorMapping, config: ModelConfig):
    """One Hugging Face tensor (numpy-like) -> the k2jax layout (a view where possible)."""
    target = k2jax_shape(mapping, config)
    if mapping.layout == "identity":
        return array
    if mapping.layout == "transpose":
        return array.T
    if mapping.layout == "heads_in":
        return array.T.reshape(target)
    if mapping.layout == "heads_out":
        return array.T.reshape(target)
    raise ValueError(mapping.layout)


def k2jax_to_hf(array, mapping: TensorMapping, config: ModelConfig):
    """One k2jax parameter (unstacked) -> the Hugging Face layout."""
    if mapping.layout == "identity":
        return array
    if mapping.layout == "transpose":
        return array.T
    if mapping.layout == "heads_in":
        e = array.shape[0]
        return array.reshape(e, -1).T
    if mapping.layout == "heads_out":
        e = array.shape[-1]
        return array.reshape(-1, e).T
    raise ValueError(mapping.layout)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(get_tensor: Callable[[str], np.ndarray], config: ModelConfig,
                   dtype=None) -> dict:
    """Build the k2jax params tree (scanned or not, per config.scan_layers) in memory.

    `get_tensor(name)` returns one Hugging Face tensor as a numpy array. Meant for small models
    and tests; the converters stream tensor by tensor instead.
    """
    params: dict = {}
    for mapping in mappings(config):
        def load(name):
            array = np.asarray(hf_to_k2jax(get_tensor(name), mapping, config))
            return array.astype(dtype) if dtype is not None else array

        if not mapping.per_layer:
            _set_path(params, mapping.path, load(mapping.hf_name))
        elif config.scan_layers:
            stacked = np.stack([load(mapping.hf_name.format(i=i))
                                for i in range(config.num_layers)])
            _set_path(params, ("layers",) + mapping.path, stacked)
        else:
            for i in range(config.num_layers):
                _set_path(params, (f"layers_{i}",) + mapping.path,
                          load(mapping.hf_name.format(i=i)))
    return params


def params_to_hf(params: dict, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, array) for every tensor of a k2jax params tree."""
    for name, mapping, layer in hf_names(config):
        if layer is None:
            array = _get_path(params, mapping.path)
        elif config.scan_layers:
            array = _get_path(params, ("layers",) + mapping.path)[layer]
        else:
            array = _get_path(params, (f"layers_{layer}",) + mapping.path)
        yield name, np.asarray(k2jax_to_hf(np.asarray(array), mapping, config))


def hf_config_dict(config: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """config.json fields of a LlamaForCausalLM with this architecture (K2's fields)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
