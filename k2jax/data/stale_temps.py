"""Temporary files of killed `data pack` / `data index` runs are removed by the next run.

Every output of these commands is written as a hidden temporary sibling `.chunk_*.tmp-*`,
renamed when complete; a SIGKILL (or a lost VM) leaves the temporary behind, and at K2's scale
that is gigabytes per chunk. Every writer into a directory holds a shared flock on
`DIR/.k2jax-writers.lock` while it writes. A writer that starts and can take that lock
exclusively, even for a moment, knows no other writer is alive there (the kernel drops a dead
process's flock, even after SIGKILL), so every `.chunk_*.tmp-*` in the directory is a dead
writer's and is removed. Writers that overlap skip the cleanup; the next one to start alone
does it.
`gs://` directories have no such lock: there nothing is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from etils import epath

from k2jax.errors import UserError

LOCK_NAME = ".k2jax-writers.lock"
TEMP_PATTERN = ".chunk_*.tmp-*"  # what pack and index write; never a user's other files


def _remove_temps(directory: epath.Path) -> list[str]:
    removed = []
    for candidate in directory.glob(TEMP_PATTERN):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate.name)
    return removed


@contextlib.contextmanager
def writing_into(directory: epath.Path) -> Iterator[list[str]]:
    """Hold the directory's writers lock (shared) while writing into it; yields the names of the
    dead writers' temporary files removed on entry (empty when another writer is alive)."""
    if "://" in str(directory):
        yield []
        return
    lock_path = directory / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"{directory}: cannot be written ({err.strerror or err})") from err
    try:
        removed: list[str] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another writer is alive here: its temporaries are not ours to judge
        else:
            removed = _remove_temps(directory)
        # Not atomic from exclusive (flock(2)), but this writer has no temporaries yet.
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield removed
    finally:
        os.close(fd)
