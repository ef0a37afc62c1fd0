"""The one path abstraction for data, checkpoints, logs and weights: etils.epath, so `gs://`
works on a TPU VM with no other code. Local paths are made absolute (Orbax refuses relative
ones, and a run must not depend on the directory it was started from)."""

from __future__ import annotations

import os

from etils import epath

from k2jax.storage import is_remote


def storage_path(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))

