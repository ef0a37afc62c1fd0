"""Every output k2jax writes for a user appears complete or not at all.

A file or directory is written under a hidden sibling name in the same directory and renamed to
its final name only after the last byte; a crash, a full disk or Ctrl-C leaves at most the
hidden sibling (removed on any Python-level error), never a complete-looking output, and a
reader never sees half a file. Files are created with a plain open() and directories get the
mode a plain mkdir() would, so outputs have the modes the user's umask gives any new file.

  atomic_file(path, mode)          a file written in one `with` block (streamed or whole)
  write_bytes/json/npy_atomic      a whole file from memory
  atomic_output_dir(out, force)    a directory (converted weights); check_output refuses to
                                   overwrite without force or to replace an input
Paths may be local or `gs://` for files; output directories are local. On gs:// there is no
rename (gcsfs's move is a copy plus a delete), but an object appears only when its upload is
finalized: the file is uploaded to its final name directly and the upload is cancelled on any
error (k2jax/storage/remote.py `upload`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
from etils import epath

from k2jax.errors import UserError
from k2jax.storage import is_remote, remote
from k2jax.storage_errors import storage_failure

# An error that means "this path cannot be written here" (a missing or non-directory parent, a
# directory in the way, no permission): the user's to fix, so one line, not a traceback.
_UNWRITABLE = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def temp_sibling(path: epath.Path) -> epath.Path:
    """`.NAME.tmp-XXXXXXXX` next to `path`: hidden, unique per writer, same file system."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file open (`mode`: "wb" or "w") on a hidden sibling of `path`; when the block
    ends without error the file is closed and renamed to `path` (replacing it), otherwise it
    is removed and `path` is left as it was."""
    if is_remote(path):
        with remote.upload(path, mode) as handle:  # no rename on GCS: an upload is atomic
            yield handle
        return
    path = epath.Path(path)
    tmp = temp_sibling(path)
    try:
        try:
            handle = tmp.open(mode)
        except _UNWRITABLE as err:
            raise UserError(f"{path}: cannot be written ({err.strerror or err})") from err
        with handle:
            yield handle
        try:
            tmp.replace(path)
        except _UNWRITABLE as err:  # e.g. `path` is a directory
            raise UserError(f"{path}: cannot be written ({err.strerror or err})") from err
    except BaseException as err:
        if tmp.exists():
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:  # a full disk names the output
            err.filename = str(path)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as JSON (indent 1, sorted keys, trailing newline: stable, diffable manifests)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def check_output(out: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()
                 ) -> Path:
    """Refuse to overwrite without force, and never to replace (or nest in) an input."""
    out_path = Path(out).absolute()
    if out_path.exists() and not force:
        raise UserError(f"{out}: output directory exists; force=True replaces it")
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    for source in inputs:
        source_path = Path(source).absolute()
        if out_path == source_path or out_path in source_path.parents:
            raise UserError(f"{out}: the output would replace the input {source}")
    return out_path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a fresh staging directory `.NAME.incomplete-HOST-PID-XXXX`; on success it becomes
    `out`, on any error it is removed. The staging directories of writers on this host that are
    no longer running (a SIGKILL leaves one behind) are deleted first. An existing `out` is
    replaced only with force."""
    out_path = check_output(out, force)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"{out}: its parent is not a directory ({err})") from err
    except OSError as err:
        if storage_failure(err):
            raise
        raise UserError(f"{out}: its parent directory cannot be created ({err})") from err
    _remove_dead_staging(out_path)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out_path)}{os.getpid()}-",
                                    dir=out_path.parent))
    _chmod_as_mkdir(staging)
    try:
        yield staging
        _fsync_tree(staging)
        if out_path.exists() and not force:  # another writer finished first: keep its output
            raise UserError(f"{out}: appeared while converting (another conversion?); not "
                            "replaced (--force replaces)")
        if out_path.exists():  # --force: swap, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.old-", dir=out_path.parent))
            old.rmdir()
            out_path.rename(old)
            staging.rename(out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _chmod_as_mkdir(directory: Path) -> None:
    """mkdtemp's 0700 (private by design) -> what a plain mkdir() gives: 0777 less the umask,
    so the published directory is as readable as the user's other files."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


def _staging_prefix(out_path: Path) -> str:
    return f".{out_path.name}.incomplete-{socket.gethostname()}-"


def _remove_dead_staging(out_path: Path) -> None:
    """Delete `out_path`'s staging directories left by writers on this host that have exited.
    Others' (other hosts, live processes) are kept: they may still be writing."""
    prefix = _staging_prefix(out_path)
    for candidate in out_path.parent.glob(f"{prefix}*"):
        pid = candidate.name[len(prefix):].split("-", 1)[0]
        if candidate.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True


def _fsync_tree(root: Path) -> None:
    # Data must be on disk before the rename makes the directory look complete.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def no_trace_if_refused(*directories: str | os.PathLike) -> Iterator[None]:
    """A start refused with an error leaves nothing behind: each of `directories` that did not
    exist before the block and holds no file after a failed one is removed (with its empty
    subdirectories, e.g. run_dir/checkpoints/ from Orbax's manager). A directory holding any file
    (a checkpoint, an event file, a lock a live run holds) is kept. Local paths only."""
    local = [Path(os.fspath(d)) for d in directories if "://" not in os.fspath(d)]
    created = [d for d in local if not os.path.lexists(d)]
    try:
        yield
    except BaseException:
        for directory in created:
            _remove_if_no_files(directory)
        raise


def _remove_if_no_files(directory: Path) -> None:
    if not directory.is_dir() or any(p.is_file() or p.is_symlink()
                                     for p in directory.rglob("*")):
        return
    for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        directory.rmdir()
