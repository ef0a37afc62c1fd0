"""Temporary files of killed `data pack` / `data index` runs are removed by the next run.

Every output of these commands is written as a hidden temporary sibling `.chunk_*.tmp-*`,
renamed when complete; a SIGKILL (or a lost VM) leaves the temporary behind, and at K2's scale
that is gigabytes per chunk. Every writer into a directory holds a shared flock on
`DIR/.k2jax-writers.lock` while it writes (the last one out removes the file). A writer that
starts and can take that lock exclusively, even for a moment, knows no other writer is alive
there (the kernel drops a dead process's flock, even after SIGKILL), so every `.chunk_*.tmp-*`
in the directory is a dead writer's and is removed. Writers that overlap skip the cleanup; the
next one to start alone does it. `gs://` directories have no such lock: nothing is removed there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from etils import epath

from k2jax.storage import is_remote


LOCK_NAME = ".k2jax-writers.lock"
TEMP_PATTERN = ".chunk_*.tmp-*"  # what pack and index write; never a user's other files


def _remove_temps(directory: epath.Path) -> list[str]:
    removed = []
    for candidate in directory.glob(TEMP_PATTERN):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate.name)
    return removed


def _still_linked(fd: int, lock_path: str) -> bool:
    # A writer that was the last one out unlinked the lock file after this process opened it:
    # a lock on that inode excludes no one, so the caller starts over on the current file.
    try:
        return os.fstat(fd).st_ino == os.stat(lock_path).st_ino
    except FileNotFoundError:
        return False


def _take_lock(lock_path: str) -> tuple[int, bool]:
    """(fd holding a shared lock, whether this writer was alone when it came)."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:  # another writer is alive here
            fcntl.flock(fd, fcntl.LOCK_SH)
            alone = False
        if _still_linked(fd, lock_path):
            return fd, alone
        os.close(fd)


@contextlib.contextmanager
def writing_into(directory: epath.Path) -> Iterator[list[str]]:
    """Hold the directory's writers lock (shared) while writing into it; yields the names of the
    dead writers' temporary files removed on entry (empty when another writer is alive). The
    last writer out removes the lock file, so a finished directory holds only its outputs."""
    if is_remote(directory):
        yield []
        return
    lock_path = os.fspath(directory / LOCK_NAME)
    try:
        fd, alone = _take_lock(lock_path)
    except OSError:
        # Read-only (or not ours): nothing to clean, and a run with nothing left to write must
        # still succeed; a write that is attempted fails with its own one-line error.
        yield []
        return
    try:
        removed = _remove_temps(directory) if alone else []
        # Not atomic from exclusive (flock(2)), but this writer has no temporaries yet.
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield removed
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(lock_path)  # the last one out; a waiter sees the unlink and starts over
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)
