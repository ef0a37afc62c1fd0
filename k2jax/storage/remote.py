"""Files on `gs://` (any fsspec URL): exact ranged reads, object versions, listing,
whole-or-nothing uploads, bucket checks, copying and removing trees.

Why not just `epath.Path.open`: opening a gcsfs file is a metadata request before the first
byte (two round trips per run of lines, and the data loader makes one run per batch piece), and
how much a read fetches is the policy of gcsfs's cache, which changes between versions;
`read_range` is one HTTP GET with a Range header for exactly the bytes asked. And a
temp-name-then-rename write (atomic_write's local recipe) is a copy plus a delete on GCS
(gcsfs tries a moveTo API first and logs a traceback where it is missing), whereas a GCS upload is
already atomic: the object appears only when the upload is finalized, so `upload` writes the
final name directly and cancels the upload on any error (nothing appears then).

gcsfs is the backend, the same instance etils.epath uses for gs:// paths.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import os
import shutil
import tempfile
from typing import IO, Any, Iterator, Optional

from k2jax.errors import UserError, one_line
from k2jax.storage import is_remote
from k2jax.storage.ranged_reader import RangedReader


def filesystem(path: object = "gs://"):
    """(filesystem, key) of a URL. For gs:// the instance etils.epath itself uses, so that what
    is written here invalidates the listing cache epath reads through (a separate instance would
    keep serving "not found" for a file written since); a missing backend is one line."""
    import fsspec

    text = str(path)
    protocol = text.split("://", 1)[0]
    if protocol in ("gs", "gcs"):
        try:
            import gcsfs  # noqa: F401 - the backend fsspec's "gcs" protocol needs
            from etils.epath import backend
        except ImportError as err:
            raise UserError(f"{text}: gs:// paths need the gcsfs package (pip install gcsfs; "
                            "`pip install k2jax` installs it)") from err
        fs = backend.fsspec_backend.fs("gs://")
    else:
        fs = fsspec.filesystem(protocol)
    return fs, fs._strip_protocol(text)


def split(path: object) -> tuple[str, str]:
    """'gs://bucket/key' -> ('bucket', 'key')."""
    bucket, _, key = str(path).split("://", 1)[-1].partition("/")
    return bucket, key


def check_bucket(path: object, what: str) -> None:
    """One line naming `path` (`what`: the config key) when its bucket is missing or not
    readable with these credentials."""
    fs, _ = filesystem(path)
    bucket, _ = split(path)
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError as err:
        raise UserError(f"{what} {path}: bucket gs://{bucket} does not exist") from err
    except Exception as err:  # noqa: BLE001 - 401/403, DNS, ...: the message says which
        raise UserError(f"{what} {path}: bucket gs://{bucket} cannot be read "
                        f"({one_line(err)})") from err


def read_range(path: object, start: int, size: int) -> bytes:
    """Bytes [start, start + size) of a local or remote file: one pread / one ranged GET."""
    if size <= 0:
        return b""
    if not is_remote(path):
        fd = os.open(os.fspath(path), os.O_RDONLY)
        try:
            return os.pread(fd, size, start)
        finally:
            os.close(fd)
    fs, key = filesystem(path)
    return fs.cat_file(key, start=start, end=start + size)


def read_all(path: object) -> bytes:
    fs, key = filesystem(path)
    return fs.cat_file(key)


def open_uncached(path: object) -> IO[bytes]:
    """A binary reader whose every read(n)/readinto(b) fetches exactly those bytes (no read-ahead
    block): for large sequential tensor reads and for streaming scans that size their own reads."""
    if not is_remote(path):
        return open(os.fspath(path), "rb", buffering=0)
    return RangedReader(path, *filesystem(path))


def signature(path: object) -> dict[str, Any]:
    """What identifies a remote object's version: size, mtime (seconds, for messages) and the
    GCS generation (a rewrite of the same size within the same second gets a new generation;
    mtime alone would not tell). One metadata request."""
    fs, key = filesystem(path)
    info = fs.info(key)
    if info.get("type") == "directory":
        raise IsADirectoryError(21, "is a directory", str(path))
    mtime = info.get("mtime")
    mtime = int(mtime.timestamp()) if hasattr(mtime, "timestamp") else int(mtime or 0)
    generation = info.get("generation")
    return {"size": int(info["size"]), "mtime": mtime,
            "generation": str(generation) if generation is not None else None}


@contextlib.contextmanager
def upload(path: object, mode: str = "wb") -> Iterator[IO]:
    """A writer (`mode` "wb" or "w") for the remote object `path`, written in place: committed
    when the block ends without error and cancelled otherwise, so `path` keeps its old content
    (or stays absent) on any failure or kill. A missing bucket or no permission is one line
    naming `path`. (k2jax.atomic_write.atomic_file is the writer for local or remote paths.)"""
    fs, key = filesystem(path)
    handle = fs.open(key, "wb")
    text = io.TextIOWrapper(handle, encoding="utf-8", write_through=True) if mode == "w" else None
    try:
        yield text if text is not None else handle
        if text is not None:
            text.flush()
            text.detach()
    except BaseException:
        handle.discard()  # cancels a started resumable upload
        handle.buffer = io.BytesIO()
        handle.closed = True  # never finalize: __del__ would otherwise upload the partial buffer
        raise
    try:
        handle.close()
    except (FileNotFoundError, PermissionError) as err:
        raise UserError(f"{path}: cannot be written ({one_line(err)})") from err


def list_names(path: object) -> list[str]:
    """Names directly under a remote prefix; FileNotFoundError when nothing is there,
    PermissionError (naming `path`) when the caller may not list it."""
    fs, key = filesystem(path)
    try:
        entries = fs.ls(key, detail=False)
    except FileNotFoundError:
        raise
    except OSError as err:
        if str(err).startswith("Forbidden"):  # gcsfs's 403, which names the API request
            raise PermissionError(errno.EACCES, "permission denied", str(path)) from err
        raise
    return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]


def check_listable(path: object, what: str = "directory") -> None:
    """For a remote directory a reader is about to open: a missing prefix or bucket is a
    UserError naming it, no permission a PermissionError naming it (one line at the CLI);
    local paths are left to the reader's own checks."""
    if not is_remote(path):
        return
    try:
        list_names(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (no object under this prefix, or no such bucket; "
                        f"expected a {what})") from None


def copy_tree(source: object, target: object) -> int:
    """Copies every object under prefix `source` to the same names under `target` (server-side
    rewrites); returns how many."""
    fs, source_key = filesystem(source)
    _, target_key = filesystem(target)
    prefix = source_key.rstrip("/") + "/"
    names = fs.find(source_key)
    for name in names:
        fs.copy(name, target_key.rstrip("/") + "/" + name[len(prefix):])
    return len(names)


def remove_tree(path: object, first: Optional[str] = None) -> None:
    """Deletes every object under a remote prefix (a no-op when there is none); those named
    `first` (a base name, at any depth) before the others, so an interrupted delete never leaves
    a tree that still has one."""
    fs, key = filesystem(path)
    names = fs.find(key)
    leading = [n for n in names if first is not None and n.rsplit("/", 1)[-1] == first]
    for name in leading:
        fs.rm_file(name)
    rest = [n for n in names if n not in leading]
    if rest:
        fs.rm(rest)
    fs.invalidate_cache()


_LOCAL_COPIES: dict[tuple, str] = {}


def local_copy(path: object, skip_suffixes: tuple[str, ...] = ()) -> str:
    """A local path holding `path`'s content, for libraries that read local files only
    (transformers, SentencePiece): a remote file or directory is downloaded once per process
    into a temporary directory removed at exit, leaving out files whose names end in
    `skip_suffixes` (a tokenizer needs no weights). A local path is returned as it is."""
    if not is_remote(path):
        return os.fspath(path)
    cache_key = (str(path).rstrip("/"), tuple(skip_suffixes))
    if cache_key in _LOCAL_COPIES:
        return _LOCAL_COPIES[cache_key]
    fs, key = filesystem(cache_key[0])
    root = tempfile.mkdtemp(prefix="k2jax-local-copy-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = os.path.join(root, key.rsplit("/", 1)[-1])
    try:
        names = fs.find(key, withdirs=False)
    except FileNotFoundError:
        names = []
    if not names:
        raise UserError(f"{path}: not found (no object under this prefix, or no such bucket)")
    for name in names:
        relative = os.path.relpath(name, key) if name != key else ""
        if relative.endswith(tuple(skip_suffixes)) and relative:
            continue
        destination = os.path.join(target, relative) if relative else target
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        fs.get_file(name, destination)
    _LOCAL_COPIES[cache_key] = target
    return target
