"""The line-offset index: exact offsets, block boundaries, resume, staleness, index location."""

import json
import os

import numpy as np
import pytest

from data_fixtures import write_chunk
from k2jax.data import chunk_index
from k2jax.data.chunk_index import ChunkIndex, build_index, newline_positions, scan_line_offsets
from k2jax.errors import UserError


def naive_line_offsets(data: bytes) -> list[int]:
    starts, position = [], 0
    for line in data.splitlines(keepends=True):
        starts.append(position)
        position += len(line)
    return starts + [len(data)]


@pytest.mark.parametrize("line_length", [1, 5, 300, 5000])
def test_newline_positions_short_and_long_lines(line_length):
    rng = np.random.default_rng(line_length)
    block = b"".join(b"x" * int(rng.integers(0, 2 * line_length)) + b"\n" for _ in range(200))
    expected = [i for i, byte in enumerate(block) if byte == 10]
    assert newline_positions(block).tolist() == expected


@pytest.mark.parametrize("data", [b"", b"\n", b"a\nbb\n", b"a\nbb", b"abc", b"\n\nx\n"])
@pytest.mark.parametrize("block_bytes", [1, 2, 3, 1 << 20])
def test_scan_offsets_match_naive_across_block_boundaries(tmp_path, monkeypatch, data,
                                                           block_bytes):
    monkeypatch.setattr(chunk_index, "BLOCK_BYTES", block_bytes)
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    from etils import epath

    assert scan_line_offsets(epath.Path(path)).tolist() == naive_line_offsets(data)


def test_build_is_resumable_and_reindexes_changed_files(tmp_path):
    for chunk_id, lines in [(0, 3), (1, 5), (2, 1)]:
        write_chunk(tmp_path, chunk_id, lines)
    assert build_index(tmp_path, workers=2, progress=False) == {"indexed": [0, 1, 2],
                                                                  "skipped": []}
    index = ChunkIndex(tmp_path, [0, 1, 2])
    assert index.line_counts == {0: 3, 1: 5, 2: 1}
    data = (tmp_path / "chunk_1.jsonl").read_bytes()
    assert index.offsets(1).tolist() == naive_line_offsets(data)
    manifest = json.loads((tmp_path / ".k2index" / "chunk_1.json").read_text())
    assert manifest["num_lines"] == 5 and manifest["size"] == len(data)

    assert build_index(tmp_path, progress=False) == {"indexed": [], "skipped": [0, 1, 2]}
    write_chunk(tmp_path, 1, 6)
    assert build_index(tmp_path, progress=False) == {"indexed": [1], "skipped": [0, 2]}
    assert ChunkIndex(tmp_path, [1]).line_counts == {1: 6}


def test_stale_index_is_an_error_never_wrong_rows(tmp_path):
    path = write_chunk(tmp_path, 0, 3)
    build_index(tmp_path, progress=False)
    write_chunk(tmp_path, 0, 4)  # size changes
    with pytest.raises(UserError, match=r"chunk_0\.jsonl: index is stale .*re-run `k2jax data "
                                        r"index"):
        ChunkIndex(tmp_path, [0])
    build_index(tmp_path, progress=False)
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))  # same size, new mtime
    with pytest.raises(UserError, match="index is stale"):
        ChunkIndex(tmp_path, [0])


def test_missing_file_and_missing_index_are_named(tmp_path):
    write_chunk(tmp_path, 0, 2)
    with pytest.raises(UserError, match=r"chunk_0\.jsonl: not indexed"):
        ChunkIndex(tmp_path, [0])
    build_index(tmp_path, progress=False)
    with pytest.raises(UserError, match=r"chunk_7\.jsonl: chunk file not found"):
        ChunkIndex(tmp_path, [0, 7])


def test_index_dir_elsewhere_for_read_only_data(tmp_path):
    data, index_dir = tmp_path / "data", tmp_path / "idx"
    data.mkdir()
    write_chunk(data, 3, 4)
    build_index(data, index_dir, progress=False)
    assert not (data / ".k2index").exists()
    assert sorted(p.name for p in index_dir.iterdir()) == ["chunk_3.json", "chunk_3.offsets.npy"]
    assert ChunkIndex(data, [3], index_dir).line_counts == {3: 4}
