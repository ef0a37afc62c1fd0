"""K2's chunk order and the global-row map, on line counts alone (no files)."""

import time

import numpy as np
import pytest

from k2jax.config import DataConfig
from k2jax.data.chunked_source import ChunkedRowSource
from k2jax.data.order import (RowMap, k2_stage1_chunk_order, k2_stage2_chunk_order, move_to_end,
                              resolve_chunk_order)
from k2jax.data.loader import StepLoader
from k2jax.errors import UserError


def test_k2_stage1_order_is_exactly_the_documented_list():
    expected = (list(range(0, 16)) + list(range(32, 38)) + list(range(44, 52))
                + list(range(16, 32)) + list(range(38, 44)) + list(range(52, 160))
                + list(range(161, 186)) + list(range(187, 360)) + [160, 186])
    order = k2_stage1_chunk_order()
    assert order == expected
    assert sorted(order) == list(range(360))
    # The tail named in K2_SPEC section 4: ..., 159, 161, ..., 185, 187, ..., 359, 160, 186.
    i159 = order.index(159)
    assert order[i159:i159 + 2] == [159, 161]
    assert order[order.index(185):order.index(185) + 2] == [185, 187]
    assert order[-3:] == [359, 160, 186]
    # The moves are by list position: position 160 held chunk 160, and after that move
    # position 185 held chunk 186.
    unmoved = list(range(16)) + list(range(32, 38)) + list(range(44, 52)) + list(range(16, 32)) \
        + list(range(38, 44)) + list(range(52, 360))
    assert unmoved[160] == 160 and move_to_end(unmoved, 160)[185] == 186


def test_presets_and_explicit_lists():
    assert k2_stage2_chunk_order() == list(range(360, 380))
    assert resolve_chunk_order("sequential", [5, 1, 3]) == [1, 3, 5]
    assert resolve_chunk_order([4, 2, 2], []) == [4, 2, 2]
    with pytest.raises(UserError, match="unknown preset 'k2-stage3'"):
        resolve_chunk_order("k2-stage3", [])
    with pytest.raises(UserError, match="no chunk files"):
        resolve_chunk_order("sequential", [])


def test_row_map_locates_rows_at_chunk_boundaries():
    row_map = RowMap([7, 3, 9], [2, 0, 3])  # an empty chunk in the middle
    positions, lines = row_map.locate(np.arange(5))
    assert positions.tolist() == [0, 0, 2, 2, 2]
    assert lines.tolist() == [0, 1, 0, 1, 2]
    assert row_map.num_rows == 5
    with pytest.raises(UserError, match="global row 5 is outside"):
        row_map.locate(np.array([5]))


class CountingReader:
    """A chunk reader over fake line counts: tokens encode (chunk id, line); counts reads."""

    def __init__(self, counts: dict[int, int], seq_len: int):
        self.line_counts = counts
        self.seq_len = seq_len
        self.lines_read = 0

    def read_lines(self, chunk_id, lines):
        self.lines_read += len(lines)
        tokens = np.zeros((len(lines), self.seq_len), np.int32)
        tokens[:, 0] = chunk_id
        tokens[:, 1] = lines
        return tokens, None


def test_resume_at_step_one_million_of_a_k2_sized_order_is_fast_and_reads_one_batch():
    order = k2_stage1_chunk_order()
    counts = {c: 3_000_000 + (c * 7919) % 1000 for c in order}  # 360 files x ~3M rows
    reader = CountingReader(counts, seq_len=4)
    source = ChunkedRowSource(RowMap(order, [counts[c] for c in order]), reader, 4)
    data = DataConfig(source="k2", path="unused", seq_len=4, global_batch_size=1024,
                      micro_batch_size=1024)
    step = 1_000_000
    start = time.perf_counter()
    batch = StepLoader(source, data).global_batch(step)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    assert reader.lines_read == 1024
    # Independent reference: walk the order summing counts, in plain Python.
    first_row = step * 1024
    expected = []
    for row in (first_row, first_row + 1023):
        for chunk_id in order:
            if row < counts[chunk_id]:
                expected.append((chunk_id, row))
                break
            row -= counts[chunk_id]
    assert tuple(batch["tokens"][0, :2]) == expected[0]
    assert tuple(batch["tokens"][-1, :2]) == expected[1]


def test_moved_row_ranges_compose_with_the_chunk_order():
    reader = CountingReader({0: 10, 1: 10}, seq_len=4)
    source = ChunkedRowSource(RowMap([0, 1], [10, 10]), reader, 4)
    data = DataConfig(source="k2", path="x", seq_len=4, global_batch_size=4, micro_batch_size=4,
                      moved_row_ranges=[[8, 4]])  # rows 8..11 go to the end
    batch = StepLoader(source, data).global_batch(2)  # logical rows 8..11 -> original 12..15
    assert batch["tokens"][:, :2].tolist() == [[1, 2], [1, 3], [1, 4], [1, 5]]


def test_every_source_locates_its_rows_and_the_loader_locates_a_step():
    """RowSource.locate: chunk position, id, line and the chunk's row span, for K2 files and
    for synthetic rows alike; StepLoader.locate cuts a step at chunk and move boundaries."""
    from etils import epath

    from k2jax.data.synthetic import SyntheticSource

    files = ChunkedRowSource(RowMap([7, 3, 9], [4, 0, 5]), reader=None, seq_len=4,
                             data_dir=epath.Path("/data/k2"))
    places = files.locate(np.array([0, 3, 4, 8]))
    assert places.position.tolist() == [0, 0, 2, 2]
    assert places.chunk_id.tolist() == [7, 7, 9, 9]
    assert places.line.tolist() == [0, 3, 0, 4]
    assert places.chunk_start.tolist() == [0, 0, 4, 4]
    assert places.chunk_end.tolist() == [4, 4, 9, 9]
    assert files.chunk_file(9) == "/data/k2/chunk_9.jsonl"

    synthetic = SyntheticSource(64, 4, 0, chunk_rows=10)
    places = synthetic.locate(np.array([9, 10, 25]))
    assert places.chunk_id.tolist() == [0, 1, 2] and places.line.tolist() == [9, 0, 5]
    assert places.chunk_start.tolist() == [0, 10, 20] and synthetic.chunk_file(1) is None

    # Step 1 reads rows 3..5 of the current order: after moving row 4 to the end, original
    # rows 3 (chunk 7, line 3), 5 and 6 (chunk 9, lines 1-2).
    loader = StepLoader(files, DataConfig(source="k2", path="x", global_batch_size=3,
                                          micro_batch_size=3, moved_row_ranges=[[4, 1]]))
    assert [(p["chunk_id"], p["first_line_0based"], p["end_line_0based_exclusive"],
             p["first_batch_row"]) for p in loader.locate(1)] == [(7, 3, 4, 0), (9, 1, 3, 1)]
