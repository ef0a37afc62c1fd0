"""Parameter-only Orbax checkpoints: what `k2jax convert hf-to-orbax` writes and
`train.init_from`, `convert orbax-to-hf` and inference (k2jax/weights/: eval-loss, compare-hf,
generate, lm-eval) read. This module owns the on-disk format; k2jax/weights/ decides, once per
command, which directory and kind to read.

Layout of a weights directory DIR:
  DIR/params/             Orbax PyTree checkpoint of the params tree (scanned layout: every
                          per-layer tensor stacked on a leading `layers` axis)
  DIR/k2jax_model.json    the ModelConfig fields the weights were made for

A training checkpoint step directory (run_dir/checkpoints/<step>, item `state`) is accepted
wherever a weights directory is, and its parameters are read without the optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp

from k2jax.atomic_write import write_bytes_atomic
from k2jax.config import ModelConfig, model_config_from_dict
from k2jax.errors import UserError, one_line
from k2jax.files import read_json_object
from k2jax.paths import storage_path

PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "k2jax_model.json"


def write_model_config(directory: str, model_config: ModelConfig) -> None:
    """DIR/k2jax_model.json: the ModelConfig the weights in DIR were made for."""
    write_bytes_atomic(storage_path(directory) / MODEL_CONFIG_FILE,  # gs://: one upload
                       json.dumps(dataclasses.asdict(model_config), indent=1).encode())


def weights_kind(directory: str) -> str:
    """'params' for a weights directory, 'state' for a training checkpoint step directory."""
    path = storage_path(directory)
    if (path / PARAMS_ITEM).exists():
        return "params"
    if (path / "state").exists():
        return "state"
    if not path.exists():
        raise UserError(f"{directory}: not found")
    raise UserError(f"{directory}: not a k2jax weights directory (no params/) nor a training "
                    "checkpoint step directory (no state/)")


def read_model_config(directory: str) -> ModelConfig | None:
    """The ModelConfig stored with the weights (None if absent)."""
    path = storage_path(directory)
    if (path / MODEL_CONFIG_FILE).exists():
        return model_config_from_dict(_json_mapping(path / MODEL_CONFIG_FILE))
    config_item = path / "config"
    for candidate in (config_item / "metadata", config_item):
        if candidate.is_file():
            model = _json_mapping(candidate).get("model")
            if not isinstance(model, dict):
                raise UserError(f"{candidate}: no 'model' section (a damaged checkpoint?)")
            return model_config_from_dict(model)
    return None


def _json_mapping(path) -> dict:
    """A JSON object from a weights directory; damage (truncation, garbage) is one line."""
    data = read_json_object(path, "delete it and write the weights again (convert, or a "
                                  "training save)")
    if data is None:
        raise UserError(f"{path}: not found")
    return data


def check_stored_shapes(item: Any, target: Any) -> None:
    """Compares every tensor of `target` with the checkpoint's metadata before reading data, so
    a mismatch names the tensor (and no half-started asynchronous restore is left to fail)."""
    import jax

    handler = ocp.PyTreeCheckpointHandler()  # the item's tree metadata, no step metadata
    try:
        tree = handler.metadata(item)
    except Exception as err:
        raise UserError(f"{item}: checkpoint metadata unreadable ({one_line(err)})") from err
    finally:
        handler.close()
    tree = getattr(tree, "tree", tree)
    stored = {jax.tree_util.keystr(path): leaf
              for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    for path, want in jax.tree_util.tree_leaves_with_path(target):
        name = jax.tree_util.keystr(path)
        have = stored.get(name)
        if have is None:
            raise UserError(f"{item}: tensor {name} not found (the model config expects shape "
                            f"{tuple(want.shape)})")
        if tuple(have.shape) != tuple(want.shape):
            raise UserError(f"{item}: tensor {name} has shape {tuple(have.shape)}, the model "
                            f"config expects {tuple(want.shape)}")


def restore_params(directory: str, abstract_params: Any) -> Any:
    """Restore parameters into `abstract_params` (ShapeDtypeStructs carrying shardings, so each
    host reads only its shards). Works on weights and training-checkpoint directories."""
    path = storage_path(directory)
    kind = weights_kind(directory)
    with ocp.PyTreeCheckpointer() as checkpointer:
        if kind == "params":
            target, item = abstract_params, path / PARAMS_ITEM
        else:
            target, item = {"params": abstract_params}, path / "state"
        check_stored_shapes(item, target)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
        except Exception as err:  # shapes matched above: what is left is a damaged file
            raise UserError(f"{item}: cannot be restored ({one_line(err)})") from err
    return restored if kind == "params" else restored["params"]

