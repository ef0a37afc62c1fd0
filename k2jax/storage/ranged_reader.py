"""A remote object as a seekable binary file whose every read is one ranged GET of exactly the
bytes asked (no read-ahead block whose size is the policy of the backend's cache)."""

from __future__ import annotations

import io
import os

PIECE_BYTES = 64 << 20


class RangedReader(io.RawIOBase):
    """Reads are clipped to the object's size (asking past the end is an HTTP 416 on some
    servers)."""

    def __init__(self, path: object, fs, key: str, piece_bytes: int = PIECE_BYTES):
        """`fs`, `key`: the fsspec file system holding `path` and the object's key there."""
        self._fs, self._key = fs, key
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
