"""k2jax/data/process_local.py: a pickled chunk reader (Grain's worker processes) leaves its
open handles and lock behind and reads the same rows with its own."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from data_fixtures import SEQ_LEN, VOCAB, row_tokens, write_chunk
from k2jax.data.chunk_index import ChunkIndex, build_index
from k2jax.data.jsonl_source import JsonlChunkReader
from k2jax.data.packed import PackedChunkReader, pack_chunks


@pytest.fixture(scope="module")
def readers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    write_chunk(root, 0, 5, masked_lines=(3,))
    build_index(root, progress=False)
    pack_chunks(root, root / "packed", seq_len=SEQ_LEN, vocab_size=VOCAB, progress=False)
    return {"jsonl": JsonlChunkReader(ChunkIndex(root, [0]), SEQ_LEN, VOCAB),
            "packed": PackedChunkReader(root / "packed", [0], SEQ_LEN, VOCAB)}


@pytest.mark.parametrize("kind, handles", [("jsonl", "_fds"), ("packed", "_maps")])
def test_a_pickled_reader_has_no_handles_a_new_lock_and_the_same_rows(readers, kind, handles):
    reader = readers[kind]
    tokens, mask = reader.read_lines(0, np.array([3, 4]))
    assert getattr(reader, handles)  # a local file: its handle is cached
    copy = pickle.loads(pickle.dumps(reader))
    assert getattr(copy, handles) == {} and copy._lock is not reader._lock
    assert getattr(reader, handles)  # the original keeps its own
    copy_tokens, copy_mask = copy.read_lines(0, np.array([3, 4]))
    np.testing.assert_array_equal(copy_tokens, tokens)
    np.testing.assert_array_equal(copy_tokens[1], row_tokens(0, 4))
    np.testing.assert_array_equal(copy_mask, mask)
    assert mask is not None and mask[1].all() and not mask[0].all()
