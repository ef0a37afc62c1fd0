"""Read a k2jax weights directory, or a training checkpoint step directory, one layer slice at
a time, in the Hugging Face layout.

Orbax's metadata API gives each leaf's name (its key in the checkpoint), shape and dtype;
TensorStore then reads single slices of the stacked arrays. Both the converter's own layout
(plain zarr per leaf) and Orbax's default training layout (OCDBT) are read; for a training
checkpoint (`{step, params, opt_state}`) only `params` is touched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from k2jax.checkpoint.params_io import PARAMS_ITEM, read_model_config, weights_kind
from k2jax.config import ModelConfig
from k2jax.convert.orbax_writer import hf_view, leaf_shape
from k2jax.errors import UserError
from k2jax.hf import name_map
from k2jax.paths import storage_path
from k2jax.storage import is_remote, remote
from k2jax.tree_paths import get_path


class OrbaxParamsReader:
    """`start_read_hf(mapping, layer, buffer)` -> one parameter (unstacked) in the HF layout."""

    def __init__(self, directory: str):
        self.directory = storage_path(directory) if is_remote(directory) else Path(directory)
        remote.check_listable(directory, "k2jax weights or checkpoint step directory")
        self.kind = weights_kind(directory)
        config = read_model_config(directory)
        if config is None:
            raise UserError(f"{directory}: no k2jax_model.json (nor a training config) to say "
                            "which model these weights belong to")
        self.config: ModelConfig = config
        # Absolute: Orbax's metadata of a relative path is None (`--checkpoint runs/...`).
        self._item = storage_path(directory) / (PARAMS_ITEM if self.kind == "params"
                                                else "state")
        logging.getLogger("absl").setLevel(logging.ERROR)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                metadata = checkpointer.metadata(self._item).item_metadata
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise UserError(f"{self._item}: cannot read the Orbax checkpoint metadata ({err})")
        if metadata is None:  # Orbax returns None, not an error, when _METADATA is gone
            raise UserError(f"{self._item}: no Orbax tree metadata (_METADATA missing); not a "
                            "complete checkpoint")
        tree = metadata.tree
        if self.kind == "state":
            if "params" not in tree:
                raise UserError(f"{self._item}: training checkpoint without 'params'")
            tree = tree["params"]
        self._tree = tree
        self._driver = "zarr3" if metadata.use_zarr3 else "zarr"
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self._item)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def leaf_key(self, mapping: name_map.TensorMapping, layer: Optional[int]
                 ) -> tuple[tuple[str, ...], Optional[int]]:
        """(leaf path, index into the leaf's leading axis or None) for one parameter."""
        if not mapping.per_layer:
            return mapping.path, None
        if self.config.scan_layers:
            return ("layers",) + mapping.path, layer
        return (f"layers_{layer}",) + mapping.path, None

    def check(self) -> np.dtype:
        """Every parameter the config names is present with its shape; returns the stored dtype
        of the largest one (for the default export dtype), and sets `largest_nbytes` (one
        parameter, as stored). Raises UserError otherwise."""
        stored = {}
        self.largest_nbytes = 0
        for name, mapping, layer in name_map.hf_names(self.config):
            path, index = self.leaf_key(mapping, layer)
            meta = self._metadata(path)
            if meta is None:
                raise UserError(f"{self._item}: missing parameter {'/'.join(path)} "
                                f"(for {name})")
            want = (leaf_shape(mapping, self.config) if index is not None
                    else name_map.k2jax_shape(mapping, self.config))
            if tuple(meta.shape) != tuple(want):
                raise UserError(f"{self._item}: parameter {'/'.join(path)} has shape "
                                f"{list(meta.shape)}, expected {list(want)} from the model config")
            if np.dtype(meta.dtype).kind != "f" and str(meta.dtype) != "bfloat16":
                raise UserError(f"{self._item}: parameter {'/'.join(path)} has dtype "
                                f"{meta.dtype}, expected a float dtype")
            stored[np.prod(want)] = np.dtype(meta.dtype)
            count = int(np.prod(want[1:] if index is not None else want))
            self.largest_nbytes = max(self.largest_nbytes, count * np.dtype(meta.dtype).itemsize)
        return stored[max(stored)]

    def start_read_hf(self, mapping: name_map.TensorMapping, layer: Optional[int],
                      buffer: np.ndarray) -> tuple[ts.WriteFutures, np.ndarray]:
        """Start reading one parameter into `buffer` (uint8, reused) in the Hugging Face layout,
        as stored. Returns (future, array): `array` (HF shape, a view of `buffer`) is valid
        once `future.result()` returns. TensorStore does the permutation while copying out of
        its chunks, which the converter's own layout stores in HF order already."""
        path, index = self.leaf_key(mapping, layer)
        order = name_map.hf_order(mapping, stacked=index is not None)  # unscanned: no layer axis
        source = hf_view(self._store(path), order, index)
        dtype = source.dtype.numpy_dtype
        nbytes = int(np.prod(source.shape, dtype=np.int64)) * dtype.itemsize
        if buffer.nbytes < nbytes:
            buffer = np.empty(nbytes, np.uint8)
        target = buffer[:nbytes].view(dtype).reshape(source.shape)
        future = ts.array(target, copy=False, write=True).write(source)
        return future, target.reshape(name_map.hf_shape(mapping, self.config))

    def _metadata(self, path: tuple[str, ...]):
        try:
            node = get_path(self._tree, path)
        except (KeyError, TypeError):  # TypeError: a leaf where the path goes on
            return None
        # Flax's boxed parameters (nn.Partitioned) are saved with a 'value' child.
        if isinstance(node, dict) and set(node) == {"value"}:
            node = node["value"]
        return None if isinstance(node, dict) else node

    def _store(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._open:
            name = self._metadata(path).name  # the leaf's key inside the checkpoint
            base = str(self._item) if is_remote(self._item) else \
                f"file://{self._item.absolute()}"
            kvstore = ({"driver": "ocdbt", "base": f"{base}/", "path": name} if self._ocdbt
                       else f"{base}/{name}/")
            spec = {"driver": self._driver, "kvstore": kvstore, "open": True}
            try:
                self._open[path] = ts.open(spec, context=self._context).result()
            except ValueError as err:
                raise UserError(f"{self._item}: cannot open parameter {name} ({err})")
        return self._open[path]
