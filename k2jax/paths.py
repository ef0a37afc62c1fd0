"""The one path abstraction for data, checkpoints, logs and weights: etils.epath, so `gs://`
works on a TPU VM with no other code. Local paths are made absolute (Orbax refuses relative
ones, and a run must not depend on the directory it was started from)."""

from __future__ import annotations

import os

from etils import epath


def storage_path(path: str | os.PathLike) -> epath.Path:
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike) -> None:
    """Give a file or directory from tempfile.mkstemp / mkdtemp (0600 / 0700, private by
    design) the mode a plain open() / mkdir() would: 0666 / 0777 less the umask, so a published
    output is as readable as the user's other files."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())
