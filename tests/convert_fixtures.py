"""Hugging Face directories for the conversion tests, written the way real checkpoints are:
sharded or single safetensors (with index), sharded or single PyTorch .bin (K2's converter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from hf_models import tiny_llama

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_hf_model(**kwargs):
    # 250: not a multiple of 128; 2 kv heads: GQA exercises the head reshapes.
    defaults = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2)
    defaults.update(kwargs)
    return tiny_llama(**defaults)


def write_hf_dir(directory: Path, state: dict[str, torch.Tensor], config: dict,
                 fmt: str = "safetensors", shards: int = 1) -> Path:
    """Write `state` as a HF directory: shards > 1 gives index + model-0000X-of-0000Y files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    names = list(state)
    groups = [names[i::shards] for i in range(shards)]  # interleaved: shards mix layers
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = (f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" if shards > 1
                     else f"{stem}.{ext}")
        part = {name: state[name].contiguous() for name in group}
        if fmt == "safetensors":
            save_file(part, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(part, directory / file_name)
        weight_map.update({name: file_name for name in group})
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return directory


def hf_state(model, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    return {k: v.detach().to(TORCH_DTYPES[dtype]).clone() for k, v in model.state_dict().items()}


def hf_config(model, **changes) -> dict:
    config = model.config.to_dict()
    config.update(changes)
    return config


def read_safetensors_dir(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of an exported directory, as raw bit patterns (exact comparison)."""
    from safetensors import safe_open

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for file_name in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / file_name), framework="pt") as f:
            for name in f.keys():
                out[name] = _bits(f.get_tensor(name))
    return out


def _bits(tensor: torch.Tensor) -> np.ndarray:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(width).numpy()


def state_bits(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: _bits(v) for k, v in state.items()}


def write_converted_tiny_model(root: Path) -> Path:
    """`root/hf` (a tiny random LlamaForCausalLM) and `root/weights` (its hf-to-orbax
    conversion); returns root."""
    from k2jax.cli import main

    model = tiny_hf_model()
    write_hf_dir(root / "hf", hf_state(model), hf_config(model))
    assert main(["convert", "hf-to-orbax", "--hf", str(root / "hf"), "--out",
                 str(root / "weights"), "--no-progress"]) == 0
    return root
