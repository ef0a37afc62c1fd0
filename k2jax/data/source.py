"""The contract between row sources and the trainer.

A row source holds `num_rows` rows of `seq_len` tokens in training order (None rows: unbounded).
`read_rows(rows)` returns, for int64 global row indices `rows` [n]:
  tokens    int32   [n, seq_len]
  loss_mask float32 [n, seq_len]  weight of predicting token i+1 from position i; the last
                                  position is always 0 (K2: 2047 predictions per 2048-token row).
"""

from __future__ import annotations

from typing import Optional, Protocol

import numpy as np


class RowSource(Protocol):
    seq_len: int
    num_rows: Optional[int]

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
