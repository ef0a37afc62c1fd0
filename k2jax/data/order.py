"""K2's chunk order and the map from global row index to (chunk file, line).

This module is the single source of truth for the order in which K2 saw its data
(docs/k2.md; the reasoning behind `k2_stage1_chunk_order` is in docs/data.md):
the chunk files are concatenated in list order into one sequence of global rows, and training
step t reads rows [t * B, (t + 1) * B). Everything here works on line counts alone, so the
mapping is testable (and `k2jax data locate` is fast) without reading any chunk.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from k2jax.errors import UserError

K2_STAGE1_CHUNKS = 360
# K2's training script put these chunks first (docs/k2.md).
K2_STAGE1_HEAD = list(range(0, 16)) + list(range(32, 38)) + list(range(44, 52))
# After each malignant loss spike the team restarted and moved the chunk at this list
# position (0-based, in the list as it stood) to the end (docs/k2.md).
K2_STAGE1_SPIKE_MOVES = (160, 185)
K2_STAGE2_CHUNKS = range(360, 380)

PRESETS = ("k2-stage1", "k2-stage2", "sequential")


def move_to_end(chunk_ids: Sequence[int], position: int) -> list[int]:
    """The list with the element at `position` moved to the end."""
    ids = list(chunk_ids)
    ids.append(ids.pop(position))
    return ids


def k2_stage1_chunk_order() -> list[int]:
    """K2 stage 1: the head list, then every remaining id of 0..359 ascending, then the moves.

    Result: [0..15, 32..37, 44..51, 16..31, 38..43, 52..159, 161..185, 187..359, 160, 186].
    """
    head = set(K2_STAGE1_HEAD)
    ids = K2_STAGE1_HEAD + [i for i in range(K2_STAGE1_CHUNKS) if i not in head]
    for position in K2_STAGE1_SPIKE_MOVES:
        ids = move_to_end(ids, position)
    return ids


def k2_stage2_chunk_order() -> list[int]:
    """K2 stage 2: chunks 360..379 in id order (unconfirmed: docs/k2.md)."""
    return list(K2_STAGE2_CHUNKS)


def resolve_chunk_order(order: Union[str, Sequence[int]], available_ids: Sequence[int]
                        ) -> list[int]:
    """Chunk ids in training order for a preset name or an explicit list.

    `available_ids` are the chunk files present (used by 'sequential'); missing files named by
    other orders are reported by the reader with the file name.
    """
    if isinstance(order, str):
        if order == "k2-stage1":
            return k2_stage1_chunk_order()
        if order == "k2-stage2":
            return k2_stage2_chunk_order()
        if order == "sequential":
            if not available_ids:
                raise UserError("data.order 'sequential': no chunk files found")
            return sorted(int(i) for i in available_ids)
        raise UserError(f"config key 'data.order': unknown preset {order!r} "
                        f"(known: {', '.join(PRESETS)}, or a list of chunk ids)")
    ids = [int(i) for i in order]
    if not ids or min(ids) < 0:
        raise UserError(f"config key 'data.order': expected a non-empty list of chunk ids >= 0, "
                        f"got {list(order)[:8]}")
    return ids


class RowMap:
    """Global row index <-> (position in the chunk order, 0-based line in that chunk).

    `line_counts[k]` is the number of rows of the chunk at order position k. Lookups are a
    binary search over cumulative counts: O(n log K) for n rows, independent of the step.
    """

    def __init__(self, chunk_ids: Sequence[int], line_counts: Sequence[int]):
        if len(chunk_ids) != len(line_counts):
            raise ValueError("chunk_ids and line_counts differ in length")
        self.chunk_ids = np.asarray(chunk_ids, np.int64)
        self.line_counts = np.asarray(line_counts, np.int64)
        # ends[k] = first global row after position k; starts[k] = ends[k] - line_counts[k].
        self.ends = np.cumsum(self.line_counts)
        self.starts = self.ends - self.line_counts

    @property
    def num_rows(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global rows int64 [n]: order positions int64 [n] and 0-based lines int64 [n]."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            bad = int(rows.max()) if rows.size and rows.max() >= self.num_rows else int(rows.min())
            raise UserError(f"global row {bad} is outside the data order, which holds "
                            f"{self.num_rows} rows in {len(self.chunk_ids)} chunk files")
        positions = np.searchsorted(self.ends, rows, side="right")
        return positions, rows - self.starts[positions]
