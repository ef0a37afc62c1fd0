"""Reading the small JSON, YAML and .npy files k2jax writes (beside k2jax/atomic_write.py,
which writes them), local or gs://: a missing file is None, a damaged one is one line naming it
and saying what to do (`remedy`), never a traceback."""

from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import numpy as np
import yaml
from etils import epath

from k2jax.errors import UserError
from k2jax.storage import is_remote

REWRITE = "delete it and re-run the command that wrote it"


def read_text(path: epath.Path, remedy: str = REWRITE, kind: str = "a file") -> Optional[str]:
    """The file's text, or None when it does not exist (`kind`: "a JSON file", ...)."""
    path = epath.Path(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected {kind}; {remedy}") from None
    except NotADirectoryError:
        raise UserError(f"{path.parent}: is a file, expected a directory holding "
                        f"{path.name}; {remedy}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a text file ({err.reason}); {remedy}") from None


def read_json(path: epath.Path, remedy: str = REWRITE, what: str = "valid JSON") -> Any:
    """The parsed file, or None when it does not exist. `what` names the kind of file in the
    message (e.g. "a k2jax data order record")."""
    text = read_text(path, remedy, "a JSON file")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not {what} ({err.msg} at line {err.lineno}); "
                        f"{remedy}") from None


def read_json_object(path: epath.Path, remedy: str = REWRITE) -> Optional[dict]:
    """A JSON file that must hold an object (a manifest, a config)."""
    data = read_json(path, remedy)
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}; "
                        f"{remedy}")
    return data


def read_yaml(path: epath.Path, remedy: str = REWRITE) -> Any:
    """The parsed file, or None when it does not exist."""
    text = read_text(path, remedy)
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({type(err).__name__}); {remedy}") from None


def read_npy(path: epath.Path, mmap: bool = True, remedy: str = REWRITE) -> np.ndarray:
    """A .npy array; memory-mapped when the file is local (GCS files are read whole). A file
    that is not a whole .npy array (truncated, a directory) is one line ending in `remedy`;
    a missing one raises FileNotFoundError."""
    try:
        if mmap and not is_remote(path):
            return np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
        with epath.Path(path).open("rb") as f:
            return np.load(io.BytesIO(f.read()), allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, EOFError, OSError) as err:  # numpy reports a short file as ValueError
        problem = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise UserError(f"{path}: not a complete .npy array ({problem}); {remedy}") from None
