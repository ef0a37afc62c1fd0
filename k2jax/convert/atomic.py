"""An output directory appears complete or not at all.

Everything is written into a hidden sibling `.NAME.incomplete-HOST-PID-XXXX` and renamed to
NAME only after the last byte is written; an interrupted conversion leaves only the hidden
directory (or nothing), never a directory that looks complete. The next conversion to NAME
deletes the staging directories of writers on this host that are no longer running (a
SIGKILL leaves one behind). An existing NAME is replaced only with force.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from k2jax.errors import UserError
from k2jax.paths import chmod_as_created
from k2jax.storage_errors import storage_failure


def check_output(out: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()
                 ) -> Path:
    """Refuse to overwrite without force, and never to replace (or nest in) an input."""
    out_path = Path(out).absolute()
    if out_path.exists() and not force:
        raise UserError(f"{out}: output directory exists; pass --force to replace it")
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    for source in inputs:
        source_path = Path(source).absolute()
        if out_path == source_path or out_path in source_path.parents:
            raise UserError(f"{out}: the output would replace the input {source}")
    return out_path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it becomes `out`, on any error it is removed."""
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
    chmod_as_created(staging)  # mkdtemp's 0700 would make the published directory private
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
