"""One run per run_dir: an exclusive lock held for the whole of `k2jax train`.

Two trainers on one run_dir interleave checkpoints, `config.yaml` and `metrics.jsonl` and one
run is silently lost. The lock is `run_dir/k2jax.lock`, held with flock(2) by process 0 and
holding the holder's host, PID and start time for the refusal message. The kernel drops a
flock when its process dies (even by SIGKILL), so a lock file left by a dead process is taken
over with no check of PIDs, and PID reuse cannot keep a run_dir locked. On NFS, Linux maps
flock onto NFS byte-range locks, so hosts sharing the file system exclude each other too.

GCS has no lock that dies with its holder: a run_dir on gs:// gets a leased lock object instead
(k2jax/checkpoint/gcs_lock.py). `run_dir_lock` picks the kind.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Optional

from etils import epath

from k2jax.errors import UserError, one_line
from k2jax.run_dir import LOCK_FILE, RunDir

LOCK_NAME = LOCK_FILE


def run_dir_lock(run_dir: RunDir, enabled: bool = True):
    """The lock of `run_dir`: flock(2) on a local (or NFS) path, a leased object on gs://."""
    if run_dir.remote:
        from k2jax.checkpoint.gcs_lock import GcsRunLock

        return GcsRunLock(run_dir, enabled=enabled)
    return RunDirLock(run_dir.path, enabled=enabled)


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']} PID {holder['pid']} (since {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file is being written or unreadable)"


class RunDirLock:
    """`with RunDirLock(run_dir):` holds the lock; a held lock raises UserError naming the
    holder. `enabled=False` (processes other than 0) does nothing."""

    def __init__(self, run_dir: epath.Path, enabled: bool = True):
        self.run_dir = epath.Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.enabled = enabled
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        if not self.enabled:
            return
        RunDir(self.run_dir).ensure()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"train.run_dir {self.run_dir}: cannot write its lock file "
                                f"{self.path} ({one_line(err)})") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"train.run_dir {self.run_dir}: cannot lock {self.path} "
                                    f"({one_line(err)})") from err
                raise UserError(f"train.run_dir {self.run_dir} is in use by "
                                f"{_describe_holder(holder)}; lock file {self.path}") from None
            # The previous holder may have unlinked the file between our open and our flock:
            # then we hold a lock on a deleted inode, so start over on the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd

    def check(self) -> None:
        """flock cannot be lost while held: nothing to check (see GcsRunLock.check)."""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter then retries on a new file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
