"""Write a k2jax weights directory (k2jax.checkpoint.params_io format) one layer slice at a time.

Orbax saves a PyTree from arrays held in memory; a stacked 65B leaf (q_proj: [80, 8192, 64,
128], 10.7 GB in bf16) must never be. So:
  1. Orbax itself saves the tree with tiny placeholder leaves (same structure, dtype and rank),
     which writes its own metadata (_METADATA, _CHECKPOINT_METADATA) in its own format, with
     OCDBT off so each leaf is a plain zarr array in its own directory params/<leaf>/;
  2. each leaf's zarr array is then recreated by TensorStore at its full shape, chunked one
     layer slice (or less) per chunk, and filled slice by slice as tensors arrive.
Orbax's restore reads shape, chunks and dtype from each array's own .zarray, so the result
restores with `restore_params` into any sharding (verified by tests/test_convert.py).
Chunks are uncompressed: bf16/fp32 weights barely compress and zstd would make conversion
CPU-bound.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from k2jax.checkpoint.params_io import MODEL_CONFIG_FILE, PARAMS_ITEM
from k2jax.config import ModelConfig
from k2jax.convert import dtypes
from k2jax.hf import name_map

CHUNK_BYTES = 64 * 2**20  # upper bound per chunk file: small enough for sharded reads


def leaf_path(mapping: name_map.TensorMapping) -> tuple[str, ...]:
    """Path of a table entry's leaf in the scanned params tree."""
    return (("layers",) + mapping.path) if mapping.per_layer else mapping.path


def leaf_shape(mapping: name_map.TensorMapping, config: ModelConfig) -> tuple[int, ...]:
    """[L, *param] for per-layer tensors (stacked on the scan axis), else the param's shape."""
    shape = name_map.k2jax_shape(mapping, config)
    return ((config.num_layers,) + shape) if mapping.per_layer else shape


def chunk_shape(shape: tuple[int, ...], itemsize: int, per_layer: bool) -> list[int]:
    """One layer per chunk (a layer slice is written whole), halving the largest other axis
    until a chunk is at most CHUNK_BYTES, so a host restoring a shard reads little extra."""
    chunks = list(shape)
    if per_layer:
        chunks[0] = 1
    while math.prod(chunks) * itemsize > CHUNK_BYTES:
        axis = max(range(1 if per_layer else 0, len(chunks)), key=lambda a: chunks[a])
        if chunks[axis] == 1:
            break
        chunks[axis] = -(-chunks[axis] // 2)
    return chunks


class StreamingParamsWriter:
    """`write(mapping, layer, k2jax_array)` for every table entry and layer, then `close()`."""

    def __init__(self, directory: Path, config: ModelConfig, dtype: np.dtype):
        self._directory = Path(directory)
        self._dtype = np.dtype(dtype)
        self._config = dataclasses.replace(config, scan_layers=True,
                                           param_dtype=dtypes.NUMPY_TO_NAME[self._dtype])
        item = self._directory / PARAMS_ITEM
        mappings = name_map.mappings(self._config)
        skeleton: dict = {}
        for mapping in mappings:
            ndim = len(leaf_shape(mapping, self._config))
            _set(skeleton, leaf_path(mapping), np.zeros((1,) * ndim, self._dtype))
        _quiet_orbax()
        with ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False) as checkpointer:
            checkpointer.save(item, skeleton)
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._arrays = {}
        for mapping in mappings:
            leaf_dir = item / ".".join(leaf_path(mapping))
            if not (leaf_dir / ".zarray").is_file():  # Orbax's leaf naming is what we rely on
                raise RuntimeError(f"Orbax did not write {leaf_dir}/.zarray; its non-OCDBT "
                                   "layout changed and orbax_writer.py needs updating")
            shape = leaf_shape(mapping, self._config)
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(leaf_dir)},
                "metadata": {
                    "shape": list(shape), "dtype": _zarr_dtype(self._dtype),
                    "chunks": chunk_shape(shape, self._dtype.itemsize, mapping.per_layer),
                    "compressor": None, "fill_value": None, "dimension_separator": ".",
                },
                "create": True, "delete_existing": True,
            }
            self._arrays[mapping] = ts.open(spec, context=context).result()

    @property
    def config(self) -> ModelConfig:
        """The config stored with the weights (scanned, param_dtype = the stored dtype)."""
        return self._config

    def write(self, mapping: name_map.TensorMapping, layer: int | None, array: np.ndarray
              ) -> None:
        """Write one parameter in the k2jax layout (unstacked), already of the output dtype.

        Blocks until written: the caller reuses the buffer behind `array` afterwards.
        """
        if array.dtype != self._dtype:
            raise ValueError(f"{mapping.hf_name}: dtype {array.dtype}, writer holds {self._dtype}")
        target = self._arrays[mapping]
        target = target[layer] if layer is not None else target
        target.write(array).result()

    def close(self) -> None:
        (self._directory / MODEL_CONFIG_FILE).write_text(
            json.dumps(dataclasses.asdict(self._config), indent=1))


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == dtypes.SAFETENSORS_TO_NUMPY["BF16"] else dtype.str


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _quiet_orbax() -> None:
    # Without OCDBT Orbax warns that it has no per-process OCDBT files to merge: expected here.
    logging.getLogger("absl").setLevel(logging.ERROR)
