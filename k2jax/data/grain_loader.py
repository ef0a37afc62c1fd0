"""Grain input pipeline over per-step host batches.

The dataset's element k is step `start_step + k`: (step, {"tokens": int32 [B/P, S],
"loss_mask": float32 [B/P, S]}), this process's slice of the global batch of that step
(StepBatches). Because a batch is a pure function of the step, the position in the data is the
step stored in the Orbax checkpoint: resuming, after preemption or with a different number of
hosts, is building this dataset again at the checkpoint's step. No iterator state is saved.

Threads (ReadOptions) overlap file reads with training; worker processes (mp_prefetch) add CPU
for JSON parsing. Both keep the element order, so the step sequence is exact.
"""

from __future__ import annotations

from typing import Iterator, Optional

import grain
import numpy as np

from k2jax.config import Config
from k2jax.data.pipeline import StepBatches, make_step_batches
from k2jax.errors import UserError

UNBOUNDED_STEPS = 2**62  # for sources without an end (synthetic)


def available_steps(step_batches: StepBatches) -> int:
    """The end (exclusive) of the steps whose whole global batch the data holds: steps are
    numbered from data.first_step, which reads row data.start_row."""
    num_rows = step_batches.source.num_rows
    if num_rows is None:
        return UNBOUNDED_STEPS
    data = step_batches.data  # steps are numbered from data.first_step
    return data.first_step + max(0, (num_rows - data.start_row) // data.global_batch_size)


class HostBatchSource:
    """grain RandomAccessDataSource: record `step` is this process's batch of that step."""

    def __init__(self, step_batches: StepBatches):
        self.step_batches = step_batches
        self._len = available_steps(step_batches)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self.step_batches.host_batch(int(step))

    def __repr__(self) -> str:  # grain logs sources; keep it short
        return f"HostBatchSource(steps={self._len}, host_batch={self.step_batches.host_batch_size})"


class _ReadStep:
    """Picklable map function (workers receive it): step -> (step, host batch)."""

    def __init__(self, source: HostBatchSource):
        self.source = source

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        return int(step), self.source[int(step)]


def host_batch_dataset(step_batches: StepBatches, start_step: int = 0,
                       num_steps: Optional[int] = None) -> grain.MapDataset:
    """MapDataset of (step, host batch) for steps [start_step, start_step + num_steps)."""
    source = HostBatchSource(step_batches)
    stop = len(source) if num_steps is None else start_step + num_steps
    if start_step < 0 or stop > len(source):
        raise UserError(f"steps [{start_step}, {stop}) requested but the data holds only "
                        f"{len(source)} steps of {step_batches.data.global_batch_size} rows")
    return grain.MapDataset.range(start_step, stop).map(_ReadStep(source))


def iterate_host_batches(step_batches: StepBatches, start_step: int = 0,
                         num_steps: Optional[int] = None, worker_count: int = 0,
                         prefetch: int = 2) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (step, host batch) from `start_step` on, read ahead by Grain.

    worker_count: 0 reads in this process with `prefetch` threads; N > 0 uses N worker
    processes, each keeping `prefetch` batches ready. Batches come out in step order either way.
    """
    dataset = host_batch_dataset(step_batches, start_step, num_steps)
    read_options = grain.ReadOptions(num_threads=max(1, prefetch) if prefetch else 0,
                                     prefetch_buffer_size=prefetch)
    iter_dataset = dataset.to_iter_dataset(read_options)
    if worker_count > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(1, prefetch)))
    return iter(iter_dataset)


def _mark_absl_flags_parsed() -> None:
    # grain 0.2.18 reads an absl flag when starting workers and raises UnparsedFlagAccessError
    # in programs that do not use absl.app (google/grain#1355, fixed upstream by #1362): use the
    # flags' defaults, as later grain versions do.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_host_batch_iterator(config: Config, start_step: int, process_index: int = 0,
                             process_count: int = 1, num_steps: Optional[int] = None
                             ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The trainer's entry point: this process's (step, batch) stream from `start_step` on."""
    step_batches = make_step_batches(config, process_index, process_count)
    if num_steps is None and step_batches.source.num_rows is None:
        num_steps = max(0, config.train.steps - start_step)
    return iterate_host_batches(step_batches, start_step, num_steps,
                                config.data.worker_count, config.data.prefetch)


__all__ = ["available_steps", "HostBatchSource", "host_batch_dataset", "iterate_host_batches",
           "make_host_batch_iterator"]
