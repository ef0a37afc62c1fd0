"""Repeating a finite order for fine-tuning (`data.epochs`): which source row each row of the
repeated order is.

The repeated order holds `epochs` x N rows (N: the rows of the order, after its chunk order).
Epoch 0 reads the order as it is, so `data.epochs: 1` (K2's configs, the default) changes
nothing. Epoch e >= 1 reads the same N rows in a fixed permutation, numpy's PCG64 seeded with
[EPOCH_SEED, e]: a different row order per epoch (no batch repeats its predecessor's
neighbours), the same on every host and every rerun, and a pure function of the row, so a
resume at any step reads what an uninterrupted run reads. A step may span two epochs: it takes
the last rows of one and the first rows of the next. Moved windows (`data.moved_row_ranges`,
rollbacks) apply to the repeated order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

EPOCH_SEED = 0x6b32  # "k2": fixed, so the order is a function of the data and the epoch alone


@lru_cache(maxsize=4)
def epoch_permutation(num_rows: int, epoch: int) -> np.ndarray:
    """int64 [num_rows]: row k of epoch `epoch` (>= 1) is row permutation[k] of the order."""
    permutation = np.random.default_rng([EPOCH_SEED, epoch]).permutation(num_rows)
    permutation.flags.writeable = False
    return permutation


def source_rows(rows: np.ndarray, num_rows: int, epochs: int) -> np.ndarray:
    """Rows of the order repeated `epochs` times (int64 [n], each < epochs * num_rows) -> rows
    of the order (int64 [n], each < num_rows)."""
    rows = np.asarray(rows, np.int64)
    if epochs == 1:
        return rows
    epoch, within = np.divmod(rows, num_rows)
    out = within.copy()
    for e in np.unique(epoch[epoch > 0]):
        chosen = epoch == e
        out[chosen] = epoch_permutation(num_rows, int(e))[within[chosen]]
    return out
