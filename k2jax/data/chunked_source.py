"""The K2 row source: chunk files concatenated in order, read as jsonl or packed.

`ChunkedRowSource` implements the RowSource contract (k2jax/data/source.py) on top of a
RowMap (order + line counts) and a chunk reader (jsonl through its index, or packed), so both
forms give identical rows by construction and the order logic is shared.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence, Union

import numpy as np
from etils import epath

from k2jax.data import chunk_files, packed
from k2jax.data.chunk_index import ChunkIndex
from k2jax.data.jsonl_source import JsonlChunkReader
from k2jax.data.order import RowMap, resolve_chunk_order
from k2jax.data.source import RowPlaces, shifted_loss_mask
from k2jax.errors import UserError
from k2jax.storage import is_remote


class ChunkReader(Protocol):
    line_counts: dict[int, int]

    def read_lines(self, chunk_id: int, lines: np.ndarray
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """tokens int32 [n, S] and tgt_mask uint8 [n, S] (None: no row has one, or the reader
        was told not to read masks)."""


class ChunkedRowSource:
    """Rows of the chunk files in order. read_rows -> tokens int32 [n, S], loss_mask f32 [n, S]."""

    def __init__(self, row_map: RowMap, reader: ChunkReader, seq_len: int, form: str = "",
                 data_dir: Optional[epath.Path] = None):
        self.row_map = row_map
        self.reader = reader
        self.seq_len = seq_len
        self.form = form
        self.data_dir = data_dir

    @property
    def num_rows(self) -> int:
        return self.row_map.num_rows

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        positions, lines = self.row_map.locate(rows)
        tokens = np.empty((len(rows), self.seq_len), np.int32)
        tgt_mask: Optional[np.ndarray] = None
        for position in np.unique(positions):
            selected = np.flatnonzero(positions == position)
            chunk_tokens, chunk_mask = self.reader.read_lines(
                int(self.row_map.chunk_ids[position]), lines[selected])
            tokens[selected] = chunk_tokens
            if chunk_mask is not None:
                if tgt_mask is None:
                    tgt_mask = np.ones((len(rows), self.seq_len), np.uint8)
                tgt_mask[selected] = chunk_mask
        return tokens, shifted_loss_mask(len(rows), self.seq_len, tgt_mask)

    def locate(self, rows: np.ndarray) -> RowPlaces:
        positions, lines = self.row_map.locate(np.asarray(rows, np.int64))
        return RowPlaces(position=positions, chunk_id=self.row_map.chunk_ids[positions],
                         line=lines, chunk_start=self.row_map.starts[positions],
                         chunk_end=self.row_map.ends[positions])

    def chunk_file(self, chunk_id: int) -> Optional[str]:
        """K2's file of the chunk (chunk_{i}.jsonl, also for the packed form made from it)."""
        if self.data_dir is None:
            return None
        return os.fspath(chunk_files.jsonl_path(self.data_dir, chunk_id))


def detect_format(data_dir: epath.Path, chunk_ids: Sequence[int]) -> str:
    """'packed' when every chunk of the order has a packed manifest, else 'jsonl'."""
    if all(packed.packed_manifest_path(data_dir, c).exists() for c in set(chunk_ids)):
        return "packed"
    return "jsonl"


def open_chunk_source(path: str | os.PathLike, order: Union[str, Sequence[int]],
                      seq_len: int, vocab_size: int, form: str = "auto",
                      index_dir: Optional[str | os.PathLike] = None, *,
                      use_tgt_mask: bool = False) -> ChunkedRowSource:
    """Open K2 chunk files at `path` in `order` (a preset name or chunk id list).

    form: 'jsonl' (needs `k2jax data index`), 'packed' (needs `k2jax data pack`) or 'auto'.
    use_tgt_mask: False (K2 stage 1, data.use_tgt_mask) ignores rows' tgt_mask, and the packed
    mask files are never opened.
    Missing files, missing or stale indexes raise UserError naming the file.
    """
    data_dir = epath.Path(path)
    if not is_remote(data_dir) and not data_dir.is_dir():  # gs://: find_chunk_ids says
        raise UserError(f"data.path {data_dir}: not a directory")
    available = sorted(set(chunk_files.find_chunk_ids(data_dir, "jsonl"))
                       | set(chunk_files.find_chunk_ids(data_dir, "packed")))
    chunk_ids = resolve_chunk_order(order, available)
    if form == "auto":
        form = detect_format(data_dir, chunk_ids)
    missing = [c for c in dict.fromkeys(chunk_ids) if c not in available]
    if missing:
        name = "packed chunk" if form == "packed" else "chunk file"
        position = chunk_ids.index(missing[0])
        raise UserError(f"{chunk_files.jsonl_path(data_dir, missing[0])}: {name} not found "
                        f"(named by data.order {order if isinstance(order, str) else 'list'} at "
                        f"position {position}; {len(missing)} of {len(set(chunk_ids))} missing)")
    if form == "packed":
        reader: ChunkReader = packed.PackedChunkReader(data_dir, chunk_ids, seq_len, vocab_size,
                                                       read_mask=use_tgt_mask)
    elif form == "jsonl":
        reader = JsonlChunkReader(ChunkIndex(data_dir, chunk_ids, index_dir), seq_len, vocab_size,
                                  read_mask=use_tgt_mask)
    else:
        raise UserError(f"config key 'data.format': expected auto, jsonl or packed, got {form!r}")
    row_map = RowMap(chunk_ids, [reader.line_counts[c] for c in chunk_ids])
    return ChunkedRowSource(row_map, reader, seq_len, form, data_dir)
