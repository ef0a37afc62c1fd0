"""Write a k2jax weights directory (k2jax.checkpoint.params_io format) one layer slice at a time.

Orbax saves a PyTree from arrays held in memory; a stacked 65B leaf (K2's q_proj: [layers,
hidden, heads, head_dim], 10.7 GB in bf16) must never be. So:
  1. Orbax itself saves the tree with tiny placeholder leaves (same structure, dtype and rank),
     which writes its own metadata (_METADATA, _CHECKPOINT_METADATA) in its own format, with
     OCDBT off so each leaf is a plain zarr v3 array in its own directory params/<leaf>/;
  2. each leaf's zarr array is then recreated by TensorStore at its full shape, chunked one
     layer slice (or less) per chunk, and filled slice by slice as tensors arrive.

Each leaf keeps the k2jax (logical) shape, e.g. gate_proj [L, in, out], but a zarr3 `transpose`
codec stores its chunks in the Hugging Face byte order ([L, out, in]). Hugging Face bytes thus
go to disk as they are read, with no CPU transpose (the converter's former bottleneck), and
each chunk is one contiguous byte range of one HF tensor. Orbax's restore opens each array from
its own zarr.json (codecs included), so `restore_params` returns the k2jax layout into any
sharding (tests/test_convert.py); TensorStore transposes each host's shards as it reads them.
Chunks are uncompressed: bf16/fp32 weights barely compress and zstd would make conversion
CPU-bound.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from k2jax import dtypes
from k2jax.checkpoint.params_io import PARAMS_ITEM, write_model_config
from k2jax.config import ModelConfig
from k2jax.hf import name_map
from k2jax.paths import storage_path
from k2jax.tree_paths import set_path

CHUNK_BYTES = 64 * 2**20  # upper bound per chunk file: small enough for sharded reads


def leaf_path(mapping: name_map.TensorMapping) -> tuple[str, ...]:
    """Path of a table entry's leaf in the scanned params tree."""
    return (("layers",) + mapping.path) if mapping.per_layer else mapping.path


def leaf_shape(mapping: name_map.TensorMapping, config: ModelConfig) -> tuple[int, ...]:
    """[L, *param] for per-layer tensors (stacked on the scan axis), else the param's shape."""
    shape = name_map.k2jax_shape(mapping, config)
    return ((config.num_layers,) + shape) if mapping.per_layer else shape


def chunk_shape(shape: tuple[int, ...], itemsize: int, per_layer: bool,
                order: tuple[int, ...] | None = None) -> list[int]:
    """One layer per chunk (a layer slice is written whole), then halving the slowest on-disk
    axis (then the next) until a chunk is at most CHUNK_BYTES: so every chunk is one contiguous
    byte range of its HF tensor, and a host restoring a shard reads little extra."""
    order = order or tuple(range(len(shape)))
    chunks = list(shape)
    if per_layer:
        chunks[0] = 1
    for axis in order[1 if per_layer else 0:]:
        while math.prod(chunks) * itemsize > CHUNK_BYTES and chunks[axis] > 1:
            chunks[axis] = -(-chunks[axis] // 2)
    return chunks


def hf_view(store: ts.TensorStore, order: tuple[int, ...], layer: int | None) -> ts.TensorStore:
    """One parameter of a stacked leaf, its axes permuted into HF order: a view, no I/O.

    Reading or writing through it moves bytes in on-disk order when the leaf was written by
    this module (the copy is then sequential), and still works on any other layout."""
    if layer is not None:
        store = store[layer]
        order = tuple(a - 1 for a in order[1:])
    return store[ts.d[order].transpose[:]] if order != tuple(range(len(order))) else store


def kvstore_spec(directory) -> dict:
    """TensorStore's key-value store for a local or gs:// directory."""
    text = str(directory)
    if text.startswith("gs://"):
        bucket, _, path = text.removeprefix("gs://").partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/"}
    return {"driver": "file", "path": text}


class StreamingParamsWriter:
    """`write(mapping, layer, hf_array)` for every table entry and layer, then `close()`."""

    def __init__(self, directory: Path, config: ModelConfig, dtype: np.dtype):
        self._directory = storage_path(directory)  # epath: local or gs://
        self._dtype = np.dtype(dtype)
        self._config = dataclasses.replace(config, scan_layers=True,
                                           param_dtype=dtypes.from_numpy(self._dtype).name)
        item = self._directory / PARAMS_ITEM
        mappings = name_map.mappings(self._config)
        skeleton: dict = {}
        for mapping in mappings:
            ndim = len(leaf_shape(mapping, self._config))
            set_path(skeleton, leaf_path(mapping), np.zeros((1,) * ndim, self._dtype))
        _quiet_orbax()
        with ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=True) as checkpointer:
            checkpointer.save(item, skeleton)
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._arrays = {}
        for mapping in mappings:
            leaf_dir = item / ".".join(leaf_path(mapping))
            if not (leaf_dir / "zarr.json").is_file():  # Orbax's leaf naming is what we rely on
                raise RuntimeError(f"Orbax did not write {leaf_dir}/zarr.json; its non-OCDBT "
                                   "layout changed and orbax_writer.py needs updating")
            shape = leaf_shape(mapping, self._config)
            order = name_map.hf_order(mapping, stacked=mapping.per_layer)
            chunks = chunk_shape(shape, self._dtype.itemsize, mapping.per_layer, order)
            codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
            if order != tuple(range(len(order))):
                codecs.insert(0, {"name": "transpose", "configuration": {"order": list(order)}})
            spec = {
                "driver": "zarr3",
                "kvstore": kvstore_spec(leaf_dir),
                "metadata": {
                    "shape": list(shape), "data_type": dtypes.from_numpy(self._dtype).name,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                    "codecs": codecs, "fill_value": 0,
                },
                "create": True, "delete_existing": True,
            }
            self._arrays[mapping] = (ts.open(spec, context=context).result(), order)

    @property
    def config(self) -> ModelConfig:
        """The config stored with the weights (scanned, param_dtype = the stored dtype)."""
        return self._config

    def write(self, mapping: name_map.TensorMapping, layer: int | None, hf_array: np.ndarray
              ) -> ts.WriteFutures:
        """Start writing one parameter given in the Hugging Face layout, already of the output
        dtype and C-contiguous. Returns TensorStore's futures: `hf_array`'s memory must stay
        untouched until `.result()` (the commit) returns, because TensorStore is allowed to
        write from it directly instead of copying it first (one memory copy fewer per byte)."""
        if hf_array.dtype != self._dtype:
            raise ValueError(f"{mapping.hf_name}: dtype {hf_array.dtype}, writer holds "
                             f"{self._dtype}")
        if not hf_array.flags.c_contiguous:
            raise ValueError(f"{mapping.hf_name}: the writer takes C-contiguous arrays")
        store, order = self._arrays[mapping]
        target = hf_view(store, order, layer)
        return target.write(hf_array.reshape(target.shape),
                            can_reference_source_data_indefinitely=True)

    def close(self) -> None:
        write_model_config(self._directory, self._config)


def _quiet_orbax() -> None:
    # Without OCDBT Orbax warns that it has no per-process OCDBT files to merge: expected here.
    logging.getLogger("absl").setLevel(logging.ERROR)
