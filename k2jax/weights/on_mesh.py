"""Weights onto a device mesh: from a Hugging Face directory (converted in memory, one tensor
at a time, through the name map) or from a k2jax weights directory / training checkpoint.

No host ever holds the whole model: every tensor goes to its devices as soon as it is read
(`jax.make_array_from_callback`, so on a pod each host supplies only its own shards), and the
per-layer tensors of the scanned layout are stacked on device, one parameter group at a time.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.checkpoint import params_io
from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.hf.name_map import hf_shape, hf_to_k2jax, mappings
from k2jax.model.param_count import abstract_params
from k2jax.sharding.rules import param_shardings
from k2jax.tree_paths import get_path, set_path


def sharded_abstract_params(config: ModelConfig, mesh: Mesh, rules: dict) -> tuple[Any, Any]:
    """(unboxed ShapeDtypeStruct tree, NamedSharding tree) of the params, allocating nothing."""
    boxed = abstract_params(config)
    return nn.meta.unbox(boxed), param_shardings(boxed, mesh, rules)


def _to_devices(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _without_leading_axis(sharding: NamedSharding, ndim: int) -> NamedSharding:
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


def params_from_hf_on_mesh(get_tensor: Callable[[str], np.ndarray], config: ModelConfig,
                           mesh: Mesh, rules: dict, log: Optional[Callable[[str], None]] = None
                           ) -> Any:
    """The k2jax params tree (config.scan_layers layout, config.param_dtype), sharded on `mesh`.

    get_tensor(name) -> float32 numpy array in the Hugging Face layout.
    """
    shapes, shardings = sharded_abstract_params(config, mesh, rules)
    dtype = jnp.dtype(config.param_dtype)
    params: dict = {}
    names = mappings(config)

    def load(name: str, mapping) -> np.ndarray:
        array = get_tensor(name)
        expected = hf_shape(mapping, config)
        if tuple(array.shape) != expected:
            raise UserError(f"tensor {name}: shape {list(array.shape)} does not fit the model "
                            f"config (expected {list(expected)})")
        return np.ascontiguousarray(hf_to_k2jax(array, mapping, config), dtype=dtype)

    for k, mapping in enumerate(names):
        if log:
            log(f"weights {k + 1}/{len(names)}: {mapping.hf_name}")
        if not mapping.per_layer:
            set_path(params, mapping.path, _to_devices(load(mapping.hf_name, mapping),
                                                   get_path(shardings, mapping.path)))
        elif config.scan_layers:
            sharding = get_path(shardings, ("layers",) + mapping.path)
            ndim = len(get_path(shapes, ("layers",) + mapping.path).shape)
            per_layer_sharding = _without_leading_axis(sharding, ndim)
            layers = [_to_devices(load(mapping.hf_name.format(i=i), mapping), per_layer_sharding)
                      for i in range(config.num_layers)]
            stacked = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*layers)
            del layers  # frees the per-layer copies before the next group is read
            set_path(params, ("layers",) + mapping.path, stacked)
        else:
            for i in range(config.num_layers):
                path = (f"layers_{i}",) + mapping.path
                set_path(params, path, _to_devices(load(mapping.hf_name.format(i=i), mapping),
                                               get_path(shardings, path)))
    return params


def params_from_checkpoint_on_mesh(directory: str, config: ModelConfig, mesh: Mesh,
                                   rules: dict) -> Any:
    """Restore a weights directory or training checkpoint step directory (scanned layout)
    straight into sharded arrays of config.param_dtype."""
    if not config.scan_layers:
        raise UserError("k2jax checkpoints hold the scanned layout (internal: use "
                        "scan_layers=True and unstack afterwards)")
    shapes, shardings = sharded_abstract_params(config, mesh, rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    return params_io.restore_params(directory, target)


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned layout -> per-layer `layers_{i}` layout (host numpy; for small-model checks)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], params["layers"])
    return out
