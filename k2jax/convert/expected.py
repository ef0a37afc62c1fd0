"""What a model config expects of a checkpoint, and the checks run before anything is written.

The names, layouts and shapes come from k2jax.hf.name_map (the one table); this module only
compares them with what a checkpoint holds and words the errors.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from k2jax import dtypes
from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.hf import name_map

# Older transformers saved RoPE's inverse frequencies as a buffer; they follow from rope_theta.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclasses.dataclass(frozen=True)
class ExpectedTensor:
    """One Hugging Face tensor: its HF shape, its table entry and layer (None if not per layer)."""
    name: str
    hf_shape: tuple[int, ...]
    mapping: name_map.TensorMapping
    layer: Optional[int]


def expected_tensors(config: ModelConfig) -> dict[str, ExpectedTensor]:
    """Every HF tensor of the model, in Hugging Face order (embedding, layers, norm, lm_head)."""
    entries = {name: ExpectedTensor(name, name_map.hf_shape(m, config), m, layer)
               for name, m, layer in name_map.hf_names(config)}
    return dict(sorted(entries.items(), key=lambda kv: _hf_order(kv[1])))


def _hf_order(entry: ExpectedTensor) -> tuple:
    table_index = name_map.TABLE.index(entry.mapping)
    if entry.layer is not None:
        return (1, entry.layer, table_index)
    return (0 if entry.name == "model.embed_tokens.weight" else 2, 0, table_index)


def check_tensors(found: Iterable, config: ModelConfig, where: str) -> None:
    """Compare a checkpoint's tensors (objects with name, shape, dtype, file) with the model.

    Raises one UserError naming the tensor and file: unexpected tensor (including biases),
    unsupported dtype, vocab mismatch, shape mismatch, missing tensor.
    """
    expected = expected_tensors(config)
    seen = set()
    for info in found:
        if info.name.endswith(IGNORED_SUFFIXES):
            continue
        if info.name not in expected:
            why = " (biases are not supported: K2 has none)" if info.name.endswith(".bias") else ""
            raise UserError(f"unexpected tensor {info.name} in {info.file}{why}")
        dtypes.from_safetensors(info.dtype, f"tensor {info.name} in {info.file}")
        want = expected[info.name].hf_shape
        if tuple(info.shape) != want:
            # HF keeps [vocab, hidden] for both the embedding and lm_head.
            if info.name in _VOCAB_TENSORS and tuple(info.shape[1:]) == want[1:]:
                raise UserError(f"vocab mismatch: vocab_size={config.vocab_size} in {where} but "
                                f"{info.name} in {info.file} has {info.shape[0]} rows")
            raise UserError(f"shape mismatch: tensor {info.name} in {info.file} has shape "
                            f"{list(info.shape)}, expected {list(want)} from {where}")
        seen.add(info.name)
    missing = [name for name in expected if name not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing tensor {missing[0]}{more}: expected shape "
                        f"{list(expected[missing[0]].hf_shape)}, not found in {where}")

