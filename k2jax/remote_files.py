"""gs:// (any fsspec URL) file I/O for data and weights: exact ranged reads, object versions,
and whole-or-nothing uploads. Local paths go to the OS (and k2jax.atomic_write) as before.

Why not just `epath.Path.open`: opening a gcsfs file is a metadata request before the first
byte (two round trips per run of lines, and the data loader makes one run per batch piece), and
how much a read fetches is the policy of gcsfs's cache, which changes between versions;
`read_range` is one HTTP GET with a Range header for exactly the bytes asked. And a
temp-name-then-rename write (atomic_write's local recipe) is a copy plus a delete on GCS
(gcsfs tries a moveTo API first and logs a traceback where it is missing), whereas a GCS upload is
already atomic: the object appears only when the upload is finalized, so `upload` writes the
final name directly and cancels the upload on any error (nothing appears then).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from typing import IO, Any, Iterator

import numpy as np


def is_remote(path: object) -> bool:
    return "://" in str(path)


def _fs(path: object):
    """(filesystem, key): etils.epath's own fsspec instance, so that what is written here
    invalidates the listing cache epath reads through (a separate instance would keep serving
    "not found" for a file written since)."""
    import fsspec
    from etils.epath import backend

    text = str(path)
    epath_backend = getattr(backend, "fsspec_backend", None)
    if epath_backend is not None:
        fs = epath_backend.fs(text)
    else:  # an etils without it: the instance its gs:// backend would make
        protocol = text.split("://", 1)[0]
        options = {"finalize_on_close": True} if protocol in ("gs", "gcs") else {}
        fs = fsspec.filesystem(protocol, **options)
    return fs, fs._strip_protocol(text)


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
    fs, key = _fs(path)
    return fs.cat_file(key, start=start, end=start + size)


def read_all(path: object) -> bytes:
    fs, key = _fs(path)
    return fs.cat_file(key)


def open_uncached(path: object) -> IO[bytes]:
    """A binary reader whose every read(n)/readinto(b) fetches exactly those bytes (no read-ahead
    block): for large sequential tensor reads and for streaming scans that size their own reads."""
    if not is_remote(path):
        return open(os.fspath(path), "rb", buffering=0)
    return RangedReader(path)


PIECE_BYTES = 64 << 20


class RangedReader(io.RawIOBase):
    """A remote object as a seekable binary file: each read is one ranged GET, clipped to the
    object's size (asking past the end is an HTTP 416 on some servers)."""

    def __init__(self, path: object, piece_bytes: int = PIECE_BYTES):
        self._fs, self._key = _fs(path)
        self._piece_bytes = piece_bytes
        self.name = str(path)
        self.size = int(self._fs.info(self._key)["size"])
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer) -> int:
        """Fills `buffer` in GETs of at most `piece_bytes`, so a 0.5 GB tensor costs 64 MiB of
        transient memory beside the caller's buffer, not a second copy of the tensor."""
        view = memoryview(buffer).cast("B")
        end = min(self.size, self._position + len(view))
        filled = 0
        while self._position < end:
            stop = min(end, self._position + self._piece_bytes)
            data = self._fs.cat_file(self._key, start=self._position, end=stop)
            if not data:
                break
            view[filled:filled + len(data)] = data
            filled += len(data)
            self._position += len(data)
        return filled

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        data = self._fs.cat_file(self._key, start=self._position, end=end)
        self._position += len(data)
        return data


def signature(path: object) -> dict[str, Any]:
    """What identifies a remote object's version: size, mtime (seconds, for messages) and the
    GCS generation (a rewrite of the same size within the same second gets a new generation;
    mtime alone would not tell). One metadata request."""
    fs, key = _fs(path)
    info = fs.info(key)
    if info.get("type") == "directory":
        raise IsADirectoryError(21, "is a directory", str(path))
    mtime = info.get("mtime")
    mtime = int(mtime.timestamp()) if hasattr(mtime, "timestamp") else int(mtime or 0)
    generation = info.get("generation")
    return {"size": int(info["size"]), "mtime": mtime,
            "generation": str(generation) if generation is not None else None}


@contextlib.contextmanager
def upload(path: object) -> Iterator[IO[bytes]]:
    """A binary writer for `path`: local files through atomic_write (hidden sibling, rename);
    remote objects written in place, committed when the block ends without error and cancelled
    otherwise, so `path` keeps its old content (or stays absent) on any failure or kill."""
    if not is_remote(path):
        from k2jax.atomic_write import atomic_file

        with atomic_file(path, "wb") as handle:
            yield handle
        return
    fs, key = _fs(path)
    handle = fs.open(key, "wb")
    try:
        yield handle
    except BaseException:
        handle.discard()  # cancels a started resumable upload
        handle.buffer = io.BytesIO()
        handle.closed = True  # never finalize: __del__ would otherwise upload the partial buffer
        raise
    handle.close()


def write_bytes(path: object, data: bytes) -> None:
    with upload(path) as f:
        f.write(data)


def write_json(path: object, obj: Any) -> None:
    """`obj` as JSON (indent 1, sorted keys, trailing newline), whole or not at all."""
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_npy(path: object, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue())


def list_names(path: object) -> list[str]:
    """Names directly under a remote prefix; FileNotFoundError when nothing is there,
    PermissionError (naming `path`) when the caller may not list it."""
    fs, key = _fs(path)
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
    from k2jax.errors import UserError

    try:
        list_names(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (no object under this prefix, or no such bucket; "
                        f"expected a {what})") from None


def remove_tree(path: object) -> None:
    """Delete every object under a remote prefix (a no-op when there is none)."""
    fs, key = _fs(path)
    if fs.exists(key):
        fs.rm(key, recursive=True)
