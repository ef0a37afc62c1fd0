"""What a loss-spike rollback moves to the end of the data order (train.spikes.rollback_unit).

`step`: the spiking step's B rows. `chunk`: the rest of the chunk file holding the spiking
step, from the step's first row to the end of that file as it stands in the current order; this
is what K2's team did after each malignant spike (they moved whole chunk files; docs/k2.md
sections 4 and 6). The synthetic source has no files: its chunks are consecutive windows of
`data.synthetic_chunk_rows` rows.
"""

from __future__ import annotations

import numpy as np

from k2jax.data.loader import StepLoader
from k2jax.data.synthetic import SyntheticSource


def chunk_bounds(loader: StepLoader, row: int) -> tuple[int, int]:
    """[start, end) in the original order of the chunk file holding original row `row`."""
    if isinstance(loader.source, SyntheticSource):
        size = loader.data.synthetic_chunk_rows
        return row // size * size, row // size * size + size
    row_map = loader.source.row_map  # ChunkedRowSource: the files' line counts in order
    position = int(row_map.locate(np.asarray([row], np.int64))[0][0])
    return int(row_map.starts[position]), int(row_map.ends[position])


def rollback_window(loader: StepLoader, step: int, unit: str) -> list[int]:
    """[start, count] of the current order to move to its end after a spike at `step`."""
    start, stop = loader.logical_rows(step)
    if unit == "step":
        return [start, stop - start]
    first = int(loader.original_rows(np.asarray([start], np.int64))[0])
    lo, hi = chunk_bounds(loader, first)
    # The file's rows that follow `start` in the current order: at most the whole file, and
    # fewer where an earlier move cut it (the run ends at the first row of another file).
    end = start + (hi - lo)
    if loader.order_rows is not None:
        end = min(end, loader.order_rows)
    original = loader.original_rows(np.arange(start, end, dtype=np.int64))
    outside = np.flatnonzero((original < first) | (original >= hi))
    return [start, int(outside[0]) if len(outside) else len(original)]
