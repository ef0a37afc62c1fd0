"""Per-step batches: a batch is a pure function of the step number.

Step t reads global rows [start_row + u * B, start_row + (u + 1) * B) of the order, u = t -
data.first_step (B = data.global_batch_size), after data.moved_row_ranges is applied. Process p
of P gets the contiguous slice [p * H, (p + 1) * H) of those rows, H = padded / P, where
`padded` >= B is the row count the devices need (a multiple of the data-parallel size and of P;
K2's global batch divides no power-of-two pod). Rows past B are padding: token 0, loss mask 0, so they change
neither sum(loss * mask) nor sum(mask). The global batch is the same for any number of hosts.
Resuming at step t costs O(B) reads and needs no saved iterator: the step number in the
checkpoint is the data position.
"""

from __future__ import annotations

import numpy as np

from k2jax.config import Config, DataConfig
from k2jax.data.segments import open_document_segments
from k2jax.data.source import RowSource, apply_moved_ranges
from k2jax.data.synthetic import SyntheticSource
from k2jax.errors import UserError


class StepBatches:
    def __init__(self, source: RowSource, data: DataConfig, process_index: int = 0,
                 process_count: int = 1, padded_batch_size: int | None = None):
        padded = padded_batch_size or data.global_batch_size
        if padded < data.global_batch_size or padded % process_count:
            raise UserError(f"data.global_batch_size={data.global_batch_size} (padded to "
                            f"{padded} rows) is not divisible by the number of processes "
                            f"({process_count})")
        self.source = source
        self.data = data
        self.process_index = process_index
        self.process_count = process_count
        self.padded_batch_size = padded
        self.documents = open_document_segments(data, source)  # None unless data.reset_*

    @property
    def host_batch_size(self) -> int:
        """Rows per process, padding included."""
        return self.padded_batch_size // self.process_count

    def logical_rows(self, step: int) -> tuple[int, int]:
        """[start, stop) of `step` in the current order (data.moved_row_ranges applied)."""
        size = self.data.global_batch_size
        if step < self.data.first_step:
            raise UserError(f"step must be >= data.first_step={self.data.first_step}, got "
                            f"{step}")
        start = self.data.start_row + (step - self.data.first_step) * size
        total = self.source.num_rows
        if total is not None and start + size > total:
            raise UserError(f"step {step} needs global rows [{start}, {start + size}) but the "
                            f"order holds only {total} rows ({total // size} whole steps of "
                            f"{size})")
        return start, start + size

    def global_rows(self, step: int) -> np.ndarray:
        """Original-order row indices int64 [B] consumed by `step`."""
        start, stop = self.logical_rows(step)
        return self.original_rows(np.arange(start, stop, dtype=np.int64))

    def original_rows(self, logical: np.ndarray) -> np.ndarray:
        """Rows of the current order int64 [n] -> rows of the original order int64 [n]."""
        return apply_moved_ranges(logical, self.data.moved_row_ranges, self.source.num_rows)

    def host_rows(self, step: int) -> np.ndarray:
        """The real (unpadded) original-order rows of this process's slice of `step`."""
        lo = self.process_index * self.host_batch_size
        return self.global_rows(step)[lo:lo + self.host_batch_size]

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of `step`, padded: tokens int32 [H, S], loss_mask float32 [H, S]."""
        rows = self.host_rows(step)
        seq = self.data.seq_len
        tokens = np.zeros((self.host_batch_size, seq), np.int32)
        loss_mask = np.zeros((self.host_batch_size, seq), np.float32)
        if len(rows):
            tokens[:len(rows)], loss_mask[:len(rows)] = self.source.read_rows(rows)
        return {"tokens": tokens, "loss_mask": loss_mask, **self._document_fields(rows)}

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.global_rows(step)
        tokens, loss_mask = self.source.read_rows(rows)
        return {"tokens": tokens, "loss_mask": loss_mask,
                **self._document_fields(rows, len(rows))}

    def _document_fields(self, rows: np.ndarray, num_rows: int | None = None) -> dict:
        """segment_ids / positions int32 [num_rows (default: host batch), S] under
        data.reset_attention_mask / reset_position_ids (k2jax/data/segments.py); else none."""
        if self.documents is None:
            return {}
        return self.documents.batch_fields(rows, num_rows or self.host_batch_size)


def make_row_source(config: Config, seed: int) -> RowSource:
    """The rows of `config.data` in training order (seed only matters for synthetic data)."""
    data = config.data
    if data.source == "synthetic":
        return SyntheticSource(config.model.vocab_size, data.seq_len, seed,
                               poison_rows=data.synthetic_poison_rows,
                               poison_kind=data.synthetic_poison_kind)
    if data.source == "k2":
        from k2jax.data.chunked_source import open_chunk_source  # keeps synthetic runs light

        return open_chunk_source(data.path, data.order, data.seq_len, config.model.vocab_size,
                                 data.format, data.index_dir, use_tgt_mask=data.use_tgt_mask)
    raise UserError(f"config key 'data.source': unknown source {data.source!r}")


def make_step_batches(config: Config, process_index: int = 0, process_count: int = 1,
                      padded_batch_size: int | None = None) -> StepBatches:
    source = make_row_source(config, config.train.seed)
    return StepBatches(source, config.data, process_index, process_count, padded_batch_size)
