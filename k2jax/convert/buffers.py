"""Reused host buffers and a cache-friendly copy of transposed views.

Two facts measured on our hosts drive this module: first-touch page faults make writing into a
fresh allocation several times slower than into a warm one, and numpy's copy of a transposed
view is slower still because every read strides across rows. So each direction keeps one warm
buffer as large as its largest tensor (peak memory stays a small multiple of one tensor), and
transposed views are copied in small tiles that stay in cache.
"""

from __future__ import annotations

import numpy as np

TILE = 128  # elements per tile side: 128x128 bf16 = 32 KiB, within L1/L2 for both sides


class ReusableBuffer:
    """One uint8 buffer, grown to the largest request and handed out as typed views."""

    def __init__(self, nbytes: int = 0):
        self._raw = np.empty(nbytes, np.uint8)

    @property
    def raw(self) -> np.ndarray:
        return self._raw

    def view(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A view of the first bytes as `shape`/`dtype`; valid until the next call."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self._raw.nbytes < nbytes:
            self._raw = np.empty(0, np.uint8)  # free the old one before allocating
            self._raw = np.empty(nbytes, np.uint8)
        return self._raw[:nbytes].view(dtype).reshape(shape)


def copy_into(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[...] = src (cast to out.dtype). src may be any strided view (e.g. a transpose).

    Contiguous sources take numpy's straight copy; others go tile by tile over the first and
    last axes, so both the reads and the writes of a tile stay in cache.
    """
    if src.shape != out.shape:
        raise ValueError(f"copy_into: shapes differ {src.shape} vs {out.shape}")
    result = out
    if src.dtype == out.dtype and src.dtype.itemsize in _SAME_WIDTH_INT:
        # Bit copy through a same-width integer: exact, and far faster than the generic loops
        # numpy runs for extension dtypes such as bfloat16.
        src, out = src.view(_SAME_WIDTH_INT[src.dtype.itemsize]), out.view(
            _SAME_WIDTH_INT[src.dtype.itemsize])
    if src.flags.c_contiguous or src.ndim < 2:
        with np.errstate(over="ignore"):  # callers that narrow (fp16) check for inf themselves
            np.copyto(out, src, casting="unsafe")
        return result
    src2 = _as_2d(src)
    out2 = out.reshape(src2.shape)  # out is C-contiguous: always a view
    rows, cols = src2.shape
    with np.errstate(over="ignore"):
        _copy_tiles(src2, out2, rows, cols)
    return result


def _copy_tiles(src2: np.ndarray, out2: np.ndarray, rows: int, cols: int) -> None:
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            np.copyto(out2[i:i + TILE, j:j + TILE], src2[i:i + TILE, j:j + TILE],
                      casting="unsafe")


_SAME_WIDTH_INT = {2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}


def _as_2d(a: np.ndarray) -> np.ndarray:
    """A 2-D view of a head-split view ([E, N, D] or [N, D, E]) without copying."""
    if a.ndim == 2:
        return a
    for shape in ((a.shape[0], -1), (-1, a.shape[-1])):
        try:
            return np.reshape(a, shape, copy=False)  # raises instead of silently copying
        except ValueError:
            continue
    raise ValueError(f"cannot view strides {a.strides} of shape {a.shape} as 2-D")
