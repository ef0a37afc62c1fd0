"""The single table between Hugging Face LlamaForCausalLM tensors and k2jax parameters.

Each entry names a tensor both ways and gives its layout once: the k2jax parameter's axes (the
model's logical axis names, e.g. q_proj ("embed", "heads", "head_dim")) and the Hugging Face
tensor's axes as groups of those names in HF order (q_proj (("heads", "head_dim"), ("embed",)),
i.e. HF's [N*D, E]; HF linear weights are [out, in] and have no head axis). Everything else
derives from that: both shapes, the axis permutation (k2jax axes in HF byte order), the
transform to k2jax's layout, and the order in which the converter stores each leaf's bytes on disk. K2 uses
Hugging Face's rotate-half RoPE, so q/k weights need NO permutation of rows: only transposes
and head reshapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

import numpy as np

from k2jax.config import ModelConfig
from k2jax.tree_paths import set_path


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    hf_name: str  # "{i}" stands for the layer index in per-layer tensors
    path: tuple[str, ...]  # path in the k2jax params tree (under "layers" if per_layer)
    axes: tuple[str, ...]  # k2jax axes: the model's logical axis names (k2jax/model/)
    hf_axes: tuple[tuple[str, ...], ...]  # HF axes in order, each a group of k2jax axes merged

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def order(self) -> tuple[int, ...]:
        """The permutation: k2jax axis indices in HF (row-major, slowest first) order."""
        return tuple(self.axes.index(a) for group in self.hf_axes for a in group)


def _linear(hf_name: str, path: tuple[str, ...], in_axis: str, out_axis: str) -> TensorMapping:
    """A linear weight: k2jax [in, out], HF [out, in]."""
    return TensorMapping(hf_name, path, (in_axis, out_axis), ((out_axis,), (in_axis,)))


def _same(hf_name: str, path: tuple[str, ...], *axes: str) -> TensorMapping:
    """The same axes in the same order (embedding [V, E], norm scales [E])."""
    return TensorMapping(hf_name, path, axes, tuple((a,) for a in axes))


_L = "model.layers.{i}."
TABLE: tuple[TensorMapping, ...] = (
    _same("model.embed_tokens.weight", ("embed_tokens",), "vocab", "embed"),
    _same("model.norm.weight", ("final_norm", "scale"), "norm"),
    _linear("lm_head.weight", ("lm_head",), "embed", "vocab"),
    _same(_L + "input_layernorm.weight", ("input_norm", "scale"), "norm"),
    _same(_L + "post_attention_layernorm.weight", ("post_attention_norm", "scale"), "norm"),
    # q/k/v: k2jax [E, N, D], HF [N*D, E]; o: k2jax [N, D, E], HF [E, N*D].
    TensorMapping(_L + "self_attn.q_proj.weight", ("attention", "q_proj"),
                  ("embed", "heads", "head_dim"), (("heads", "head_dim"), ("embed",))),
    TensorMapping(_L + "self_attn.k_proj.weight", ("attention", "k_proj"),
                  ("embed", "kv_heads", "head_dim"), (("kv_heads", "head_dim"), ("embed",))),
    TensorMapping(_L + "self_attn.v_proj.weight", ("attention", "v_proj"),
                  ("embed", "kv_heads", "head_dim"), (("kv_heads", "head_dim"), ("embed",))),
    TensorMapping(_L + "self_attn.o_proj.weight", ("attention", "o_proj"),
                  ("heads", "head_dim", "embed"), (("embed",), ("heads", "head_dim"))),
    _linear(_L + "mlp.gate_proj.weight", ("mlp", "gate_proj"), "embed", "mlp"),
    _linear(_L + "mlp.up_proj.weight", ("mlp", "up_proj"), "embed", "mlp"),
    _linear(_L + "mlp.down_proj.weight", ("mlp", "down_proj"), "mlp", "embed"),
)


def axis_sizes(config: ModelConfig) -> dict[str, int]:
    """Size of every logical axis the table uses."""
    return {"vocab": config.vocab_size, "embed": config.hidden_size, "norm": config.hidden_size,
            "heads": config.num_heads, "kv_heads": config.num_kv_heads,
            "head_dim": config.resolved_head_dim, "mlp": config.intermediate_size}


def mappings(config: ModelConfig) -> list[TensorMapping]:
    """The table entries that exist for this config (no lm_head when embeddings are tied)."""
    if config.mlp_activation != "swiglu":
        from k2jax.errors import ConfigError

        raise ConfigError("model.mlp_activation", f"Hugging Face LLaMA checkpoints have a "
                          f"SwiGLU MLP; got {config.mlp_activation!r}")
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
    sizes = axis_sizes(config)
    return tuple(sizes[a] for a in mapping.axes)


def hf_shape(mapping: TensorMapping, config: ModelConfig) -> tuple[int, ...]:
    """Shape of the Hugging Face tensor."""
    sizes = axis_sizes(config)
    return tuple(math.prod(sizes[a] for a in group) for group in mapping.hf_axes)


def hf_order(mapping: TensorMapping, stacked: bool = False) -> tuple[int, ...]:
    """Permutation of a k2jax leaf's axes that gives the Hugging Face byte order; `stacked`:
    the leaf has the scan's leading layer axis, which stays first."""
    if not stacked:
        return mapping.order
    return (0,) + tuple(a + 1 for a in mapping.order)


def hf_to_k2jax(array, mapping: TensorMapping, config: ModelConfig):
    """One Hugging Face tensor (numpy-like) -> the k2jax layout: a view (reshape of the HF
    array into k2jax axes in HF order, then the inverse permutation)."""
    if tuple(array.shape) != hf_shape(mapping, config):
        raise ValueError(f"{mapping.hf_name}: shape {list(array.shape)}, expected "
                         f"{list(hf_shape(mapping, config))}")
    shape = k2jax_shape(mapping, config)
    permuted = array.reshape(tuple(shape[a] for a in mapping.order))
    return permuted.transpose(tuple(mapping.order.index(a) for a in range(len(shape))))


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
            set_path(params, mapping.path, load(mapping.hf_name))
        elif config.scan_layers:
            stacked = np.stack([load(mapping.hf_name.format(i=i))
                                for i in range(config.num_layers)])
            set_path(params, ("layers",) + mapping.path, stacked)
        else:
            for i in range(config.num_layers):
                set_path(params, (f"layers_{i}",) + mapping.path,
                          load(mapping.hf_name.format(i=i)))
    return params

