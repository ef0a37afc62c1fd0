"""Documents packed in one row: segment ids and positions that restart per document.

`k2jax data prepare-chat` packs several conversations into each row and writes, beside each
`chunk_{i}.jsonl`, `chunk_{i}.segments.npy`: uint16 [rows, seq_len], each token's 1-based
document number within its row (0: padding after the last document). The file is read by row
like the chunk itself (the same RowMap, so the order, moved rows and resume are those of the
tokens). With `data.reset_attention_mask` the batch carries `segment_ids` (attention stays
within a document); with `data.reset_position_ids` it carries `positions` (RoPE positions
restart at 0 at each document's first token). K2's pretraining did neither.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from k2jax.config import DataConfig
from k2jax.atomic_write import write_npy_atomic
from k2jax.data import chunk_files
from k2jax.errors import UserError

SEGMENT_DTYPE = np.uint16  # up to 65535 documents (and tokens) per row


def segments_path(data_dir: epath.Path, chunk_id: int) -> epath.Path:
    return data_dir / f"chunk_{chunk_id}.segments.npy"


def positions_within_documents(segment_ids: np.ndarray) -> np.ndarray:
    """int [n, S] segment ids -> int32 [n, S]: each token's index within its run of equal ids
    (a document, or the padding run)."""
    n, seq = segment_ids.shape
    index = np.broadcast_to(np.arange(seq, dtype=np.int32), (n, seq))
    starts = np.ones((n, seq), bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return (index - run_start).astype(np.int32)


class DocumentSegments:
    """Reads the segment ids of global rows (original order) of a chunked source."""

    def __init__(self, data: DataConfig, row_map):
        self.data = data
        self.data_dir = epath.Path(data.path)
        self.row_map = row_map
        self._arrays: dict[int, np.ndarray] = {}

    def _array(self, position: int) -> np.ndarray:
        chunk_id = int(self.row_map.chunk_ids[position])
        if chunk_id not in self._arrays:
            path = segments_path(self.data_dir, chunk_id)
            if not path.exists():
                flag = ("reset_attention_mask" if self.data.reset_attention_mask
                        else "reset_position_ids")
                raise UserError(f"{path}: segment ids not found (data.{flag} needs the "
                                f"segments file `k2jax data prepare-chat` writes beside each "
                                f"chunk file)")
            array = chunk_files.read_npy(path)
            expected = (int(self.row_map.line_counts[position]), self.data.seq_len)
            if array.shape != expected or array.dtype != SEGMENT_DTYPE:
                raise UserError(f"{path}: expected uint16 {list(expected)} (the rows of "
                                f"chunk_{chunk_id}), got {array.dtype} {list(array.shape)}")
            self._arrays[chunk_id] = array
        return self._arrays[chunk_id]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Global rows int64 [n] -> segment ids int32 [n, seq_len]."""
        positions, lines = self.row_map.locate(np.asarray(rows, np.int64))
        out = np.zeros((len(rows), self.data.seq_len), np.int32)
        for position in np.unique(positions):
            selected = np.flatnonzero(positions == position)
            out[selected] = self._array(int(position))[lines[selected]]
        return out

    def batch_fields(self, rows: np.ndarray, num_rows: int) -> dict[str, np.ndarray]:
        """The batch entries of `rows` padded to `num_rows` (padding: one segment, positions
        0..S-1): `segment_ids` int32 [num_rows, S] and/or `positions` int32 [num_rows, S]."""
        segment_ids = np.zeros((num_rows, self.data.seq_len), np.int32)
        if len(rows):
            segment_ids[:len(rows)] = self.read(rows)
        fields = {}
        if self.data.reset_attention_mask:
            fields["segment_ids"] = segment_ids
        if self.data.reset_position_ids:
            fields["positions"] = positions_within_documents(segment_ids)
        return fields

    def __getstate__(self):  # Grain worker processes: memory maps are reopened there
        return {**self.__dict__, "_arrays": {}}


def open_document_segments(data: DataConfig, source) -> DocumentSegments | None:
    """The segment reader batches need under `data` (None: neither reset flag is on)."""
    if not data.uses_segments:
        return None
    row_map = getattr(source, "row_map", None)
    if row_map is None:
        raise UserError("data.reset_attention_mask / data.reset_position_ids need chunk files "
                        "(data.source k2)")
    return DocumentSegments(data, row_map)


def write_segments(data_dir: str | os.PathLike, chunk_id: int, segment_ids: np.ndarray) -> None:
    """Write chunk `chunk_id`'s segment ids uint16 [rows, seq_len] atomically."""
    write_npy_atomic(segments_path(epath.Path(data_dir), chunk_id),
                                 np.asarray(segment_ids, SEGMENT_DTYPE))
