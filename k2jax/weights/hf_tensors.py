"""Random access by name to the tensors of a Hugging Face LlamaForCausalLM directory.

A thin adapter over k2jax/convert/hf_reader.py (which finds safetensors or .bin shards, checks
the index against the shards and reads headers only): inference wants tensors in
name-map order, one at a time, widened to float32. Host memory holds one tensor at a time (at
most K2's hidden x intermediate matrix in fp32, 0.72 GB); .bin shards are memory-mapped, not loaded.
"""

from __future__ import annotations

import numpy as np

from k2jax.convert.hf_reader import iter_tensors, open_hf_checkpoint
from k2jax.errors import UserError


class HFTensors:
    """`get(name)` -> float32 numpy array; `config` is the directory's config.json dict."""

    def __init__(self, directory: str):
        self.directory = directory
        self.checkpoint = open_hf_checkpoint(directory)
        self.config = self.checkpoint.config

    def get(self, name: str) -> np.ndarray:
        if name not in self.checkpoint.tensors:
            raise UserError(f"{self.directory}: tensor {name} not found in the weights")
        for _, array in iter_tensors(self.checkpoint, {name}):
            return np.array(array, dtype=np.float32)  # a copy: the reader reuses its buffer
        raise UserError(f"{self.directory}: tensor {name} could not be read")
