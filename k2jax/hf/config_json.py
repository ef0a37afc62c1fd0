"""A Hugging Face LlamaForCausalLM config.json <-> ModelConfig, both directions from one table.

`FIELDS` pairs each config.json key with its ModelConfig field; reading fills the fields
(defaults as transformers' LlamaConfig has them), writing emits them, and what k2jax's model
cannot compute (another architecture, activation, rope scaling, biases) is refused on reading
and written as the constant it is (`_LLAMA_CONSTANTS`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from k2jax import dtypes
from k2jax.config import ModelConfig, model_config_from_dict
from k2jax.errors import UserError

REQUIRED = object()  # a default meaning: config.json must have the key


@dataclasses.dataclass(frozen=True)
class Field:
    hf_key: str
    field: str  # the ModelConfig field it is read into
    default: Any  # used when config.json lacks the key or holds null
    computes: bool  # changes the model's output (compare-hf requires both sides to agree)
    written: str = ""  # the ModelConfig attribute written, when not `field`

    @property
    def source(self) -> str:
        return self.written or self.field


FIELDS: tuple[Field, ...] = (
    Field("vocab_size", "vocab_size", REQUIRED, True),
    Field("hidden_size", "hidden_size", REQUIRED, True),
    Field("intermediate_size", "intermediate_size", REQUIRED, True),
    Field("num_hidden_layers", "num_layers", REQUIRED, True),
    Field("num_attention_heads", "num_heads", REQUIRED, True),
    Field("num_key_value_heads", "num_kv_heads", None, True),  # None: num_heads (MHA)
    Field("head_dim", "head_dim", None, True, written="resolved_head_dim"),  # written explicitly
    Field("max_position_embeddings", "max_position_embeddings", 2048, False),
    Field("rope_theta", "rope_theta", 10000.0, True),
    Field("rms_norm_eps", "rms_norm_eps", 1e-6, True),
    Field("initializer_range", "initializer_range", 0.02, False),
    Field("tie_word_embeddings", "tie_word_embeddings", False, True),
    Field("bos_token_id", "bos_token_id", None, False),
    Field("eos_token_id", "eos_token_id", None, False),
    Field("pad_token_id", "pad_token_id", None, False),
)

# ModelConfig attributes two models must share to compute the same function.
ARCHITECTURE_FIELDS: tuple[str, ...] = tuple(f.source for f in FIELDS if f.computes)

# What every K2-like config.json states and k2jax's model assumes (checked on reading).
_LLAMA_CONSTANTS = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
}


def model_config_from_hf(hf_config: dict[str, Any], where: str = "config.json",
                         **overrides: Any) -> ModelConfig:
    """ModelConfig from a config.json dict; one UserError naming `where` (the file) for a field
    that is missing or wrong, or for anything k2jax's model does not compute.
    `overrides`: ModelConfig fields to set as well (dtypes, scan_layers, ...)."""
    _check_llama(hf_config, where)
    fields = {}
    for f in FIELDS:
        value = _read(hf_config, f.hf_key)
        if value is None and f.default is REQUIRED:
            raise UserError(f"{where}: missing field '{f.hf_key}'")
        fields[f.field] = f.default if value is None else value
    if fields["num_kv_heads"] is None:
        fields["num_kv_heads"] = fields["num_heads"]
    fields.update(overrides)
    try:
        config = model_config_from_dict(fields)
        config.validate()
    except UserError as err:
        raise UserError(f"{where}: {err}")
    return config


def hf_config_dict(config: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with this architecture (K2's fields); `torch_dtype`
    in either spelling ("bfloat16" or "bf16")."""
    return {
        **_LLAMA_CONSTANTS,
        **{f.hf_key: getattr(config, f.source) for f in FIELDS},
        "torch_dtype": dtypes.parse(torch_dtype, "torch_dtype").name,
        "use_cache": True,
    }


def _read(hf_config: dict[str, Any], key: str) -> Any:
    if key == "rope_theta":  # transformers 5 moved it into rope_parameters; K2's is top level
        rope = hf_config.get("rope_parameters") or {}
        return rope.get("rope_theta", hf_config.get("rope_theta"))
    return hf_config.get(key)


def _check_llama(hf_config: dict[str, Any], where: str) -> None:
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise UserError(f"{where}: architectures {architectures} is not LlamaForCausalLM")
    if hf_config.get("model_type") not in (None, "llama"):
        raise UserError(f"{where}: model_type {hf_config.get('model_type')!r} is not 'llama'")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {hf_config['hidden_act']!r} is not supported "
                        "(K2 uses silu)")
    rope = hf_config.get("rope_parameters") or {}
    if hf_config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope scaling is not supported (K2 uses none), got "
                        f"{hf_config.get('rope_scaling') or rope}")
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise UserError(f"{where}: attention_bias/mlp_bias are not supported (K2 has no biases)")
