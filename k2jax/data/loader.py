"""The one owner of the data position: step -> global rows -> this host's rows -> padded device
batch (Levanter's `DataLoader.iter_from_step`, for K2's order).

Step t reads global rows [start_row + u * B, start_row + (u + 1) * B) of the current order,
u = t - data.first_step (B = data.global_batch_size; first_step is 0 unless a run continues
another's step numbering, e.g. K2's stage 2 from step 338760): the original order after the run's moved windows
(`moved_row_ranges`: the config's, or the run's data_order.json, k2jax/run_dir.py). The
device batch is the padding plan's `padded_rows` rows (k2jax/sharding/padding.py): the B rows
in order, then padding (token 0, loss mask 0). Packed documents (data.reset_attention_mask /
reset_position_ids) add segment_ids / positions int32 [rows, S] (k2jax/data/segments.py). Process p of P feeds the contiguous slice
[p * H, (p + 1) * H), H = padded_rows / P. The global batch is the same for any number of
hosts, and resuming at step t costs O(B) reads with no saved iterator: the checkpoint's step is
the data position.

The trainer, the rollback, the data commands, eval-loss and compare-hf all read through this
class; nothing else maps a step to rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from k2jax.config import Config, DataConfig
from k2jax.data.epochs import source_rows
from k2jax.data.segments import open_document_segments
from k2jax.data.source import RowSource, apply_moved_ranges
from k2jax.data.synthetic import SyntheticSource
from k2jax.errors import UserError
from k2jax.sharding.padding import PaddingPlan, unpadded

if TYPE_CHECKING:
    from k2jax.run_dir import RunDir

UNBOUNDED_STEPS = 2**62  # for sources without an end (synthetic)
# Batch entries besides tokens and loss_mask, under data.reset_attention_mask /
# data.reset_position_ids: int32 [rows, S] each.
DOCUMENT_KEYS = ("segment_ids", "positions")


def batch_dtypes(data: DataConfig) -> dict[str, np.dtype]:
    """The batch entries `data` asks for and their dtypes (all [rows, seq_len]): tokens int32,
    loss_mask float32, and segment_ids / positions int32 for packed documents."""
    dtypes = {"tokens": np.dtype(np.int32), "loss_mask": np.dtype(np.float32)}
    if data.reset_attention_mask:
        dtypes["segment_ids"] = np.dtype(np.int32)
    if data.reset_position_ids:
        dtypes["positions"] = np.dtype(np.int32)
    return dtypes


def device_batch_shapes(padding: PaddingPlan, data: DataConfig,
                        sharding: Optional[NamedSharding]) -> dict[str, jax.ShapeDtypeStruct]:
    """The device batch as shapes (what the train step compiles for): `batch_dtypes(data)`,
    each [padding.padded_rows, data.seq_len]."""
    shape = (padding.padded_rows, data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
            for name, dtype in batch_dtypes(data).items()}


def open_row_source(config: Config) -> RowSource:
    """The rows of `config.data` in the original order (train.seed only matters for synthetic
    data)."""
    data = config.data
    if data.source == "synthetic":
        return SyntheticSource(config.model.vocab_size, data.seq_len, config.train.seed,
                               poison_rows=data.synthetic_poison_rows,
                               poison_kind=data.synthetic_poison_kind,
                               chunk_rows=data.synthetic_chunk_rows)
    if data.source == "k2":
        from k2jax.data.chunked_source import open_chunk_source  # keeps synthetic runs light

        return open_chunk_source(data.path, data.order, data.seq_len, config.model.vocab_size,
                                 data.format, data.index_dir, use_tgt_mask=data.use_tgt_mask)
    raise UserError(f"config key 'data.source': unknown source {data.source!r}")


class StepLoader:
    """Batches of a run's steps, for one process.

    padding: the device batch's rows (None: exactly B, one process's whole batch).
    sharding: where `device_batch` puts the rows (the batch axes of the mesh); None for
    host-only use (the data commands).
    moved_row_ranges: the windows moved to the end of the order, in order (None: the config's).
    """

    def __init__(self, source: RowSource, data: DataConfig,
                 moved_row_ranges: Optional[list[list[int]]] = None,
                 padding: Optional[PaddingPlan] = None, process_index: int = 0,
                 process_count: int = 1, sharding: Optional[NamedSharding] = None):
        self.padding = padding or unpadded(data.global_batch_size)
        if (self.padding.rows != data.global_batch_size
                or self.padding.padded_rows % process_count):
            raise UserError(f"data.global_batch_size={data.global_batch_size} (padded to "
                            f"{self.padding.padded_rows} rows) is not divisible by the number "
                            f"of processes ({process_count})")
        self.source = source
        self.data = data
        self.moved_row_ranges = list(data.moved_row_ranges if moved_row_ranges is None
                                     else moved_row_ranges)
        self.process_index = process_index
        self.process_count = process_count
        self.sharding = sharding
        self.documents = open_document_segments(data, source)  # None unless data.reset_*

    @classmethod
    def from_config(cls, config: Config, **kwargs) -> "StepLoader":
        return cls(open_row_source(config), config.data, **kwargs)

    @classmethod
    def for_run(cls, run_dir: "RunDir", config: Config, **kwargs) -> "StepLoader":
        """The loader of a training run: `config`'s data in the order the run has read, i.e.
        after the windows of its data_order.json (else the config's data.moved_row_ranges)."""
        return cls.from_config(config, moved_row_ranges=run_dir.moved_row_ranges(config),
                               **kwargs)

    def _replace(self, **changes) -> "StepLoader":
        """A loader over the same open source with some constructor arguments changed."""
        args = dict(moved_row_ranges=self.moved_row_ranges, padding=self.padding,
                    process_index=self.process_index, process_count=self.process_count,
                    sharding=self.sharding)
        return StepLoader(self.source, self.data, **{**args, **changes})

    def with_moved_window(self, window: list[int]) -> "StepLoader":
        """This loader after one more [start, count] window moved to the end (a rollback)."""
        return self._replace(moved_row_ranges=self.moved_row_ranges + [list(window)])

    def on_devices(self, padding: PaddingPlan, sharding: NamedSharding) -> "StepLoader":
        """This loader feeding devices: this process's slice of `padding`'s rows, put with
        `sharding` (the same rows as before: only where they go changes)."""
        return self._replace(padding=padding, sharding=sharding,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())

    def __getstate__(self):  # Grain's worker processes read host batches; devices stay here
        return {**self.__dict__, "sharding": None}

    # -- step -> rows ----------------------------------------------------------------------

    @property
    def host_batch_size(self) -> int:
        """Rows per process, padding included."""
        return self.padding.padded_rows // self.process_count

    @property
    def available_steps(self) -> int:
        """The end (exclusive) of the steps whose whole global batch the data holds: steps are
        numbered from data.first_step, which reads row data.start_row."""
        if self.order_rows is None:
            return UNBOUNDED_STEPS
        whole = (self.order_rows - self.data.start_row) // self.data.global_batch_size
        return self.data.first_step + max(0, whole)

    @property
    def order_rows(self) -> Optional[int]:
        """Rows of the order the steps read: the source's, data.epochs times (k2jax/data/
        epochs.py); None for an unbounded source."""
        rows = self.source.num_rows
        return None if rows is None else rows * self.data.epochs

    def logical_rows(self, step: int) -> tuple[int, int]:
        """[start, stop) of `step` in the current order (moved windows applied)."""
        size = self.data.global_batch_size
        if step < self.data.first_step:
            raise UserError(f"step must be >= data.first_step={self.data.first_step}, got "
                            f"{step}")
        start = self.data.start_row + (step - self.data.first_step) * size
        total = self.order_rows
        if total is not None and start + size > total:
            raise UserError(f"step {step} needs global rows [{start}, {start + size}) but the "
                            f"order holds only {total} rows ({total // size} whole steps of "
                            f"{size}; data.epochs={self.data.epochs} repeats the data)")
        return start, start + size

    def original_rows(self, logical: np.ndarray) -> np.ndarray:
        """Rows of the current order int64 [n] -> rows of the original order int64 [n] (the
        source's rows: repeated epochs map back to them)."""
        repeated = apply_moved_ranges(logical, self.moved_row_ranges, self.order_rows)
        if self.order_rows is None:
            return repeated
        return source_rows(repeated, self.source.num_rows, self.data.epochs)

    def global_rows(self, step: int) -> np.ndarray:
        """Original-order row indices int64 [B] consumed by `step`."""
        start, stop = self.logical_rows(step)
        return self.original_rows(np.arange(start, stop, dtype=np.int64))

    def locate(self, step: int) -> list[dict]:
        """Where the rows of `step` live, in batch order: one piece per run of consecutive
        original rows in one chunk (a rollback's move can split a step into several), with the
        chunk's position in the order, id, file (None: synthetic) and 0-based line range."""
        rows = self.global_rows(step)
        places = self.source.locate(rows)
        cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(places.position) != 0)) + 1
        bounds = [0, *cuts.tolist(), len(rows)]
        pieces = []
        for first, end in zip(bounds[:-1], bounds[1:]):
            chunk_id, line = int(places.chunk_id[first]), int(places.line[first])
            pieces.append({
                "order_position": int(places.position[first]), "chunk_id": chunk_id,
                "file": self.source.chunk_file(chunk_id), "first_line_0based": line,
                "end_line_0based_exclusive": line + end - first,
                "first_original_row": int(rows[first]), "num_rows": end - first,
                "first_batch_row": first})
        return pieces

    def host_rows(self, step: int) -> np.ndarray:
        """The real (unpadded) original-order rows of this process's slice of `step`."""
        lo = self.process_index * self.host_batch_size
        return self.global_rows(step)[lo:lo + self.host_batch_size]

    # -- rows -> arrays --------------------------------------------------------------------

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        """All B rows of `step`, unpadded: tokens int32 [B, S], loss_mask float32 [B, S] (and
        the document fields of `batch_dtypes`)."""
        rows = self.global_rows(step)
        tokens, loss_mask = self.source.read_rows(rows)
        return {"tokens": tokens, "loss_mask": loss_mask, **self._document_fields(rows, len(rows))}

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of `step`, padded: tokens int32 [H, S], loss_mask float32
        [H, S] (and the document fields of `batch_dtypes`)."""
        rows = self.host_rows(step)
        shape = (self.host_batch_size, self.data.seq_len)
        batch = {"tokens": np.zeros(shape, np.int32), "loss_mask": np.zeros(shape, np.float32)}
        if len(rows):
            batch["tokens"][:len(rows)], batch["loss_mask"][:len(rows)] = \
                self.source.read_rows(rows)
        return {**batch, **self._document_fields(rows, self.host_batch_size)}

    def _document_fields(self, rows: np.ndarray, num_rows: int) -> dict[str, np.ndarray]:
        """segment_ids / positions int32 [num_rows, S] of `rows` (padded), under
        data.reset_attention_mask / reset_position_ids; else none."""
        if self.documents is None:
            return {}
        return self.documents.batch_fields(rows, num_rows)

    def put(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's padded rows -> the global device batch, sharded over the batch axes
        (every process calls it with its own slice)."""
        if self.sharding is None:
            raise ValueError("StepLoader built without a sharding has no device batches")
        shapes = device_batch_shapes(self.padding, self.data, self.sharding)
        return {name: jax.make_array_from_process_local_data(self.sharding, array,
                                                              shapes[name].shape)
                for name, array in host.items()}

    def device_batch(self, step: int) -> dict[str, jax.Array]:
        return self.put(self.host_batch(step))

    def iter_from_step(self, start_step: int, stop_step: Optional[int] = None,
                       ) -> Iterator[tuple[int, dict[str, jax.Array]]]:
        """(step, device batch) for steps [start_step, stop_step), host batches read ahead by
        Grain (data.prefetch threads, or data.worker_count processes), in step order. Steps
        past the data are refused here, before anything is read."""
        stop = self.available_steps if stop_step is None else stop_step
        if start_step < self.data.first_step or stop > self.available_steps:
            raise UserError(f"steps [{start_step}, {stop}) requested but the data holds only "
                            f"{self.available_steps} steps of {self.data.global_batch_size} "
                            f"rows (data.epochs={self.data.epochs}: more epochs repeat it)")
        host_batches = self.prefetched_host_batches(start_step, stop)  # reading starts now
        return ((step, self.put(host)) for step, host in zip(range(start_step, stop),
                                                              host_batches))

    def prefetched_host_batches(self, start_step: int, stop_step: int,
                                worker_count: Optional[int] = None,
                                prefetch: Optional[int] = None
                                ) -> Iterator[dict[str, np.ndarray]]:
        """host_batch(s) for s in [start_step, stop_step), read ahead by Grain (worker_count,
        prefetch: data.worker_count, data.prefetch unless given).

        Grain does real work here: its threads (ReadOptions) overlap file reads with the step,
        and its worker processes (mp_prefetch) add CPUs for JSON parsing; both keep the order.
        """
        import grain  # here: the train step alone (benchmarks/gpu_step.py) runs without grain

        workers = self.data.worker_count if worker_count is None else worker_count
        prefetch = self.data.prefetch if prefetch is None else prefetch
        dataset = grain.MapDataset.range(start_step, stop_step).map(self.host_batch)
        iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=max(1, prefetch) if prefetch else 0, prefetch_buffer_size=prefetch))
        if workers > 0:
            _mark_absl_flags_parsed()
            iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
        return iter(iter_dataset)

    def __repr__(self) -> str:  # grain logs its map functions; keep it short
        return (f"StepLoader(steps={self.available_steps}, host_batch={self.host_batch_size}, "
                f"moved={len(self.moved_row_ranges)})")


def _mark_absl_flags_parsed() -> None:
    # grain 0.2.18 reads an absl flag when starting workers and raises UnparsedFlagAccessError
    # in programs that do not use absl.app (google/grain#1355, fixed upstream by #1362): use the
    # flags' defaults, as later grain versions do.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
