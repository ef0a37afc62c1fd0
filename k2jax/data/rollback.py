"""What a loss-spike rollback moves to the end of the data order (train.spikes.rollback_unit).

`step`: the spike's first step's B rows. `chunk`: the rest of the chunk file holding that step,
from the step's first row to the end of that file as it stands in the current order. `file`:
what K2's team did after each malignant spike (docs/k2.md, "Loss spikes"): restart from the
last good checkpoint and move WHOLE files that had not started there (K2's first restart, from
checkpoint 160, moved the file at list position 160, which starts about 100 steps after it).
The synthetic source has no files: its chunks are consecutive windows of
`data.synthetic_chunk_rows` rows.
"""

from __future__ import annotations

import numpy as np

from k2jax.data.loader import StepLoader


def chunk_bounds(loader: StepLoader, row: int) -> tuple[int, int]:
    """[start, end) in the original order of the chunk file holding original row `row`."""
    places = loader.source.locate(np.asarray([row], np.int64))
    return int(places.chunk_start[0]), int(places.chunk_end[0])


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


def file_run(loader: StepLoader, position: int) -> tuple[int, int]:
    """[start, end) of the current order's run of rows from the same file as the row at
    `position`: the whole file, or the part of it an earlier move left together."""
    first = int(loader.original_rows(np.asarray([position], np.int64))[0])
    lo, hi = chunk_bounds(loader, first)
    begin, end = max(0, position - (hi - lo) + 1), position + (hi - lo)
    if loader.source.num_rows is not None:
        end = min(end, loader.source.num_rows)
    original = loader.original_rows(np.arange(begin, end, dtype=np.int64))
    outside = (original < lo) | (original >= hi)
    before = np.flatnonzero(outside[:position - begin])
    after = np.flatnonzero(outside[position - begin:])
    start = begin + int(before[-1]) + 1 if len(before) else begin
    return start, position + int(after[0]) if len(after) else end


def rollback_files(loader: StepLoader, resume_step: int, onset_step: int) -> list[int]:
    """[start, count] of the current order to move after a spike whose trouble began at
    `onset_step`, the run restarting at `resume_step` (its last good checkpoint): the whole
    files that had not started at `resume_step` and hold rows of `onset_step`. If the onset's
    rows all come from the file under way at the checkpoint, the rest of that file from the
    checkpoint's row on (no whole file holds the trouble)."""
    resume_row = loader.logical_rows(resume_step)[0]
    onset_start, onset_stop = loader.logical_rows(onset_step)
    runs, position = [], onset_start
    while position < onset_stop:  # the runs (files) the onset step reads
        runs.append(file_run(loader, position))
        position = runs[-1][1]
    whole = [run for run in runs if run[0] >= resume_row]
    if whole:
        return [whole[0][0], whole[-1][1] - whole[0][0]]
    return [resume_row, runs[0][1] - resume_row]
