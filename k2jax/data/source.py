"""The contract between row sources and the trainer.

A row source holds `num_rows` rows of `seq_len` tokens in training order (None rows: unbounded),
cut into chunks (K2: the chunk files, in the order's sequence).
`read_rows(rows)` returns, for int64 global row indices `rows` [n]:
  tokens    int32   [n, seq_len]
  loss_mask float32 [n, seq_len]  weight of predicting token i+1 from position i; the last
                                  position is always 0 (K2: 2047 predictions per 2048-token row).
`locate(rows)` says where those rows live (`RowPlaces`), and `chunk_file(chunk_id)` names the
file of a chunk (None: the rows are computed, not read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np


@dataclass(frozen=True)
class RowPlaces:
    """Where rows of the original order live; every field int64 [n]:
    position      index, in the source's sequence of chunks, of the chunk holding the row
    chunk_id      that chunk's id (K2: the i of chunk_{i}.jsonl)
    line          the row's 0-based line in its chunk
    chunk_start   the chunk's first row in the original order
    chunk_end     the row after its last (exclusive)
    """
    position: np.ndarray
    chunk_id: np.ndarray
    line: np.ndarray
    chunk_start: np.ndarray
    chunk_end: np.ndarray


class RowSource(Protocol):
    seq_len: int
    num_rows: Optional[int]

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def locate(self, rows: np.ndarray) -> RowPlaces: ...

    def chunk_file(self, chunk_id: int) -> Optional[str]: ...


def shifted_loss_mask(num_rows: int, seq_len: int, tgt_mask: Optional[np.ndarray] = None
                      ) -> np.ndarray:
    """K2's loss mask [n, seq_len]: position i predicts token i+1; the last position is 0.

    A per-token `tgt_mask` [n, seq_len] marks which *target* tokens count, so position i takes
    tgt_mask[:, i + 1].
    """
    mask = np.ones((num_rows, seq_len), np.float32)
    if tgt_mask is not None:
        mask[:, :-1] = tgt_mask[:, 1:]
    mask[:, -1] = 0.0
    return mask


def apply_moved_ranges(logical_rows: np.ndarray, moved_row_ranges: list[list[int]],
                       num_rows: Optional[int]) -> np.ndarray:
    """Map rows of the reordered sequence back to rows of the original sequence.

    Each [start, count] in turn moves rows [start, start + count) of the order as it stands to
    its end (with an unbounded source the moved rows are never reached again).
    """
    rows = np.asarray(logical_rows, np.int64).copy()
    for start, count in reversed(moved_row_ranges):
        if num_rows is None:
            rows = np.where(rows < start, rows, rows + count)
            continue
        kept_end = num_rows - count
        rows = np.where(rows < start, rows,
                        np.where(rows < kept_end, rows + count, start + (rows - kept_end)))
    return rows
