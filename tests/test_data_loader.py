"""Batches from K2-format chunk files equal a plain reference: jsonl and packed, any host count,
through Grain, resumed mid-run; every bad input is a UserError naming file and line."""

import json
import os

import numpy as np
import pytest

from data_fixtures import (SEQ_LEN, VOCAB, k2_stage1_line_counts, reference_rows, row_tokens,
                           write_chunk)
from k2jax.config import config_from_dict
from k2jax.data.chunk_index import build_index
from k2jax.data.chunked_source import open_chunk_source
from k2jax.data.order import k2_stage1_chunk_order
from k2jax.data.packed import pack_chunks
from k2jax.data.loader import StepLoader
from k2jax.errors import UserError
from k2jax.sharding.padding import PaddingPlan

MASKED_CHUNKS = {160: (0, 2), 17: (1,)}  # tgt_mask rows, including a spike-moved chunk


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
    """360 tiny chunk files with uneven line counts, indexed and packed (into the same dir)."""
    directory = tmp_path_factory.mktemp("k2")
    for chunk_id in range(360):
        write_chunk(directory, chunk_id, k2_stage1_line_counts(chunk_id),
                    masked_lines=MASKED_CHUNKS.get(chunk_id, ()))
    build_index(directory, workers=4, progress=False)
    packed_dir = tmp_path_factory.mktemp("k2packed")
    pack_chunks(directory, packed_dir, seq_len=SEQ_LEN, vocab_size=VOCAB, workers=2,
                progress=False)
    return directory, packed_dir


def make_loader(config, process_index=0, process_count=1, padded_rows=None):
    """StepLoader of `config` for one of `process_count` hosts, the batch padded to
    `padded_rows` rows (None: no padding)."""
    rows = config.data.global_batch_size
    return StepLoader.from_config(config, padding=PaddingPlan(rows, padded_rows or rows, 1),
                                  process_index=process_index, process_count=process_count)


def k2_config(path, batch=6, form="auto", **data):
    return config_from_dict({"model": {"vocab_size": VOCAB, "max_position_embeddings": 64},
                             "data": {"source": "k2", "path": str(path), "order": "k2-stage1",
                                      "format": form, "seq_len": SEQ_LEN,
                                      "global_batch_size": batch, "micro_batch_size": batch,
                                      **data}})


@pytest.mark.parametrize("use_tgt_mask", [False, True])
def test_every_step_of_k2_stage1_matches_the_plain_reference(k2_dir, use_tgt_mask):
    directory, packed_dir = k2_dir
    ref_tokens, ref_mask = reference_rows(directory, k2_stage1_chunk_order(), use_tgt_mask)
    if not use_tgt_mask:  # K2 stage 1 (main.py): ones but the last position, tgt_mask or not
        assert (ref_mask[:, :-1] == 1).all() and (ref_mask[:, -1] == 0).all()
    batch = 6
    for path, form in [(directory, "jsonl"), (packed_dir, "packed"), (packed_dir, "auto")]:
        step_batches = make_loader(k2_config(path, batch, form,
                                                   use_tgt_mask=use_tgt_mask))
        assert step_batches.source.form == ("packed" if path == packed_dir else "jsonl")
        assert step_batches.source.num_rows == len(ref_tokens)
        for step in range(len(ref_tokens) // batch):
            got = step_batches.global_batch(step)
            rows = slice(step * batch, (step + 1) * batch)
            np.testing.assert_array_equal(got["tokens"], ref_tokens[rows])
            np.testing.assert_array_equal(got["loss_mask"], ref_mask[rows])
            assert got["tokens"].dtype == np.int32 and got["loss_mask"].dtype == np.float32
    # The spike-moved chunks are the last rows of the order, and tgt_mask shows up there.
    last = step_batches.global_batch(len(ref_tokens) // batch - 1)["tokens"]
    assert last[-1, :2].tolist() == [186, k2_stage1_line_counts(186) - 1]


def test_jsonl_and_packed_give_identical_batches_with_tgt_mask(k2_dir):
    directory, packed_dir = k2_dir
    jsonl = make_loader(k2_config(directory, 10, "jsonl", use_tgt_mask=True))
    packed = make_loader(k2_config(packed_dir, 10, "packed", use_tgt_mask=True))
    for step in range(jsonl.source.num_rows // 10):
        a, b = jsonl.global_batch(step), packed.global_batch(step)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    manifest = json.loads((packed_dir / "chunk_160.packed.json").read_text())
    assert manifest["has_mask"] and (packed_dir / "chunk_160.mask.u8").exists()
    assert not (packed_dir / "chunk_161.mask.u8").exists()


def test_without_use_tgt_mask_the_packed_mask_file_is_never_opened(tmp_path):
    write_chunk(tmp_path, 0, 3, masked_lines=(1,))
    build_index(tmp_path, progress=False)
    packed_dir = tmp_path / "packed"
    pack_chunks(tmp_path, packed_dir, seq_len=SEQ_LEN, vocab_size=VOCAB, progress=False)
    (packed_dir / "chunk_0.mask.u8").unlink()
    _, mask = open_chunk_source(packed_dir, [0], SEQ_LEN, VOCAB, "packed").read_rows(
        np.arange(3))
    expected = np.ones((3, SEQ_LEN), np.float32)
    expected[:, -1] = 0
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(UserError, match="chunk_0.mask.u8"):
        open_chunk_source(packed_dir, [0], SEQ_LEN, VOCAB, "packed", use_tgt_mask=True)


@pytest.mark.parametrize("hosts", [2, 3])
def test_hosts_get_disjoint_slices_that_make_the_global_batch(k2_dir, hosts):
    directory, _ = k2_dir
    config = k2_config(directory, batch=12)
    for step in (0, 57, 100):
        whole = make_loader(config).global_batch(step)["tokens"]
        parts = [make_loader(config, p, hosts).host_batch(step)["tokens"]
                 for p in range(hosts)]
        assert all(len(part) == 12 // hosts for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_grain_iterator_resumes_mid_run_with_identical_batches(k2_dir):
    directory, packed_dir = k2_dir
    loader = make_loader(k2_config(directory, batch=8), 1, 2)
    full = list(loader.prefetched_host_batches(0, 12, worker_count=0, prefetch=2))
    assert len(full) == 12
    for step in (0, 5, 11):
        np.testing.assert_array_equal(full[step]["tokens"], loader.host_batch(step)["tokens"])
    resumed = list(loader.prefetched_host_batches(7, 12, worker_count=0, prefetch=0))
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["loss_mask"], b["loss_mask"])
    # Worker processes (spawned; state pickled) give the same sequence.
    workers = list(make_loader(k2_config(packed_dir, batch=8), 1, 2).prefetched_host_batches(
        7, 12, worker_count=1, prefetch=2))
    for a, b in zip(resumed, workers, strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_grain_dataset_end_is_the_last_whole_step(k2_dir):
    directory, _ = k2_dir
    loader = make_loader(k2_config(directory, batch=100))
    steps = loader.source.num_rows // 100
    assert loader.available_steps == steps
    assert len(list(loader.prefetched_host_batches(steps - 2, steps))) == 2
    with pytest.raises(UserError, match="holds only"):  # refused before anything is read
        loader.iter_from_step(steps, steps + 1)


# ----------------------------------------------------------------------------------------------
# Bad input: one UserError naming the file and the 1-based line; never a skipped row.


def _one_chunk(tmp_path, lines: list[str]):
    path = tmp_path / "chunk_0.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    build_index(tmp_path, progress=False)
    return open_chunk_source(tmp_path, [0], SEQ_LEN, VOCAB, "jsonl")


GOOD = json.dumps({"token_ids": row_tokens(0, 0)})


@pytest.mark.parametrize("bad_line, message", [
    ('{"token_ids": [1, 2,', "malformed JSON"),
    ("", "empty line"),
    (json.dumps({"token_ids": list(range(SEQ_LEN - 1))}), "has 7 entries, expected data.seq_len=8"),
    (json.dumps({"token_ids": [1] * (SEQ_LEN - 1) + [VOCAB]}), "token id 32032 is outside"),
    (json.dumps({"token_ids": [-1] + [1] * (SEQ_LEN - 1)}), "token id -1 is outside"),
    (json.dumps({"token_ids": [1.5] * SEQ_LEN}), "not a flat list of integers"),
    (json.dumps({"tokens": [1] * SEQ_LEN}), "'token_ids' field"),
    (json.dumps({"token_ids": [1] * SEQ_LEN, "tgt_mask": [1] * 3}), "'tgt_mask' has 3 entries"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad_line, message):
    source = _one_chunk(tmp_path, [GOOD, GOOD, bad_line, GOOD])
    source.read_rows(np.array([0, 1, 3]))  # good rows read fine
    with pytest.raises(UserError) as err:
        source.read_rows(np.array([1, 2]))
    assert "chunk_0.jsonl:3: " in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_pack_refuses_bad_rows_and_leaves_no_partial_output(tmp_path):
    data, out = tmp_path / "d", tmp_path / "o"
    data.mkdir()
    (data / "chunk_0.jsonl").write_text(GOOD + "\n" + '{"token_ids": [1]}\n')
    build_index(data, progress=False)
    with pytest.raises(UserError, match=r"chunk_0\.jsonl:2: 'token_ids' has 1 entries"):
        pack_chunks(data, out, seq_len=SEQ_LEN, vocab_size=VOCAB, progress=False)
    assert os.listdir(out) == []


def test_missing_chunk_named_by_the_order(tmp_path):
    write_chunk(tmp_path, 0, 2)
    build_index(tmp_path, progress=False)
    with pytest.raises(UserError, match=r"chunk_1\.jsonl: chunk file not found .*k2-stage1 at "
                                        r"position 1; 359 of 360 missing"):
        open_chunk_source(tmp_path, "k2-stage1", SEQ_LEN, VOCAB)


def test_stale_index_stops_the_loader(tmp_path):
    write_chunk(tmp_path, 0, 3)
    build_index(tmp_path, progress=False)
    write_chunk(tmp_path, 0, 2)
    with pytest.raises(UserError, match="index is stale"):
        make_loader(k2_config(tmp_path, 2, order=[0]))


def test_step_past_the_end_is_an_error(tmp_path):
    write_chunk(tmp_path, 0, 3)
    build_index(tmp_path, progress=False)
    step_batches = StepLoader(open_chunk_source(tmp_path, [0], SEQ_LEN, VOCAB),
                               k2_config(tmp_path, 2, order=[0]).data)
    step_batches.global_batch(0)
    with pytest.raises(UserError, match=r"step 1 needs global rows \[2, 4\) but the order holds "
                                        r"only 3 rows"):
        step_batches.global_batch(1)


@pytest.mark.parametrize("line", [
    '{"tgt_mask": [0, 1, 1, 0, 1, 1, 1, 1], "token_ids": [1, 2, 3, 4, 5, 6, 7, 8]}',
    '{"token_ids":[1,2,3,4,5,6,7,8],"meta":{"a":[1,2]},"tgt_mask":null}',
    '{"src_filename": "\\"token_ids\\": [9]", "token_ids": [ 1 , 2,3,4,5,6,7,8 ] }',
    '{"token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "token_ids": [8, 7, 6, 5, 4, 3, 2, 1]}',
    '{"token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "tgt_mask": [true, true, false, 1, 1, 1, 1, 1]}',
])
def test_fast_row_parser_agrees_with_json(line):
    from k2jax.data.jsonl_source import parse_row

    obj = json.loads(line)
    tokens, mask = parse_row(line.encode(), "f", 1, SEQ_LEN, VOCAB)
    assert tokens.tolist() == obj["token_ids"]
    expected_mask = None if obj.get("tgt_mask") is None else [int(v) for v in obj["tgt_mask"]]
    assert (None if mask is None else mask.tolist()) == expected_mask



def test_hosts_that_do_not_divide_the_batch_get_padded_slices(k2_dir):
    """As K2's 2040 rows over 64 hosts: each host reads only its real rows of the padded
    batch; padding rows are token 0 with loss mask 0."""
    config = k2_config(k2_dir[0], batch=6)
    for step in (0, 7):
        whole = make_loader(config).global_batch(step)
        parts = [make_loader(config, p, 4, padded_rows=8).host_batch(step)
                 for p in range(4)]
        tokens = np.concatenate([part["tokens"] for part in parts])
        mask = np.concatenate([part["loss_mask"] for part in parts])
        np.testing.assert_array_equal(tokens[:6], whole["tokens"])
        np.testing.assert_array_equal(mask[:6], whole["loss_mask"])
        assert not tokens[6:].any() and not mask[6:].any()
    with pytest.raises(UserError, match="not divisible by the number of processes"):
        make_loader(config, 0, 4)
