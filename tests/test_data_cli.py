"""`k2jax data ...` through k2jax.cli.main: return codes, outputs, one-line errors."""

import json

import numpy as np
import pytest

from data_fixtures import SEQ_LEN, k2_stage1_line_counts, reference_rows, write_chunk
from k2jax.cli import main
from k2jax.data.order import k2_stage1_chunk_order


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    for chunk_id in range(360):
        write_chunk(directory, chunk_id, k2_stage1_line_counts(chunk_id))
    return directory


def run(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # quick group time (~5 s; prepare -> index -> batch stays quick)
def test_index_batch_locate_pack(k2_dir, tmp_path, capsys):
    code, out, _ = run(capsys, "index", k2_dir, "--workers", 2, "--quiet")
    assert code == 0 and "indexed 360 files" in out
    code, out, _ = run(capsys, "index", k2_dir, "--quiet")
    assert code == 0 and "skipped 360 already indexed" in out

    ref_tokens, _ = reference_rows(k2_dir, k2_stage1_chunk_order())
    batch_file = tmp_path / "b.npy"
    step, batch = 3, 7  # rows 21..27: crosses from chunk 5 into chunk 6 of the order
    code, out, _ = run(capsys, "batch", "--data", k2_dir, "--step", step, "--global-batch", batch,
                       "--seq-len", SEQ_LEN, "--order", "k2-stage1", "--out", batch_file)
    assert code == 0 and "int32 [7, 8]" in out
    got = np.load(batch_file)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref_tokens[step * batch:(step + 1) * batch])

    code, out, _ = run(capsys, "locate", "--data", k2_dir, "--step", step, "--global-batch",
                       batch, "--seq-len", SEQ_LEN)
    assert code == 0
    located = json.loads(out)
    assert located["global_rows_start"] == 21 and located["global_rows_end_exclusive"] == 28
    pieces = located["pieces"]
    assert sum(p["num_rows"] for p in pieces) == batch and len(pieces) >= 2
    for piece in pieces:  # the fixture's rows start with [chunk id, line]
        lines = range(piece["first_line_0based"], piece["end_line_0based_exclusive"])
        rows = got[piece["first_batch_row"]:piece["first_batch_row"] + piece["num_rows"]]
        assert rows[:, 0].tolist() == [piece["chunk_id"]] * len(lines)
        assert rows[:, 1].tolist() == list(lines)
        assert piece["file"].endswith(f"chunk_{piece['chunk_id']}.jsonl")

    packed = tmp_path / "packed"
    code, out, _ = run(capsys, "pack", "--data", k2_dir, "--out", packed, "--seq-len", SEQ_LEN,
                       "--chunks", "0,1,2,3,4,5,6", "--quiet")
    assert code == 0 and "packed 7 chunks" in out
    reference = reference_rows(k2_dir, [0, 1, 2, 3, 4, 5, 6])[0]  # 26 rows
    code, _, _ = run(capsys, "batch", "--data", packed, "--step", 2, "--global-batch", batch,
                     "--seq-len", SEQ_LEN, "--order", "0,1,2,3,4,5,6", "--format", "packed",
                     "--out", tmp_path / "p.npy")
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), reference[14:21])

    code, out, _ = run(capsys, "order", "--order", "k2-stage1")
    assert code == 0 and json.loads(out)[-3:] == [359, 160, 186]


def test_errors_are_one_line_with_exit_code_2(k2_dir, tmp_path, capsys):
    code, _, err = run(capsys, "batch", "--data", tmp_path / "nope", "--step", 0, "--out",
                       tmp_path / "x.npy")
    assert code == 2 and err.count("\n") == 1 and "not a directory" in err
    assert not (tmp_path / "x.npy").exists()

    write_chunk(tmp_path, 0, 3)
    (tmp_path / "chunk_1.jsonl").write_text('{"token_ids": [1, 2]}\n')
    code, _, _ = run(capsys, "index", tmp_path, "--quiet")
    assert code == 0
    code, _, err = run(capsys, "batch", "--data", tmp_path, "--step", 1, "--global-batch", 2,
                       "--seq-len", SEQ_LEN, "--order", "sequential", "--out", tmp_path / "x.npy")
    assert code == 2 and err.count("\n") == 1
    assert "chunk_1.jsonl:1: 'token_ids' has 2 entries, expected data.seq_len=8" in err
    assert not (tmp_path / "x.npy").exists()

    code, _, err = run(capsys, "locate", "--data", tmp_path, "--step", 5, "--global-batch", 2,
                       "--seq-len", SEQ_LEN, "--order", "sequential")
    assert code == 2 and "step 5 needs global rows [10, 12) but the order holds only 4 rows" in err

    write_chunk(tmp_path, 0, 5)
    code, _, err = run(capsys, "locate", "--data", tmp_path, "--step", 0, "--global-batch", 2,
                       "--seq-len", SEQ_LEN, "--order", "0")
    assert code == 2 and "index is stale" in err and err.count("\n") == 1

    # `data order --order sequential` lists the files present: without --data there are none
    # (before: "data.order 'sequential': no chunk files found", a key never given).
    code, _, err = run(capsys, "order", "--order", "sequential")
    assert code == 2 and "give --data DIR" in err and err.count("\n") == 1
    code, out, _ = run(capsys, "order", "--order", "sequential", "--data", tmp_path)
    assert code == 0 and json.loads(out) == [0, 1]


def test_prepare_then_index_then_batch(tmp_path, capsys):
    import sentencepiece

    sentences = [f"row {i} of the tiny corpus with some words" for i in range(200)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "tok"), vocab_size=300,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", minloglevel=2)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    out = tmp_path / "chunks"
    code, text, _ = run(capsys, "prepare", "--tokenizer", tmp_path / "tok.model", "--input", docs,
                        "--out", out, "--num-chunks", 2, "--seq-len", 32, "--quiet")
    assert code == 0 and "into 2 chunk files" in text
    assert run(capsys, "index", out, "--quiet")[0] == 0
    code, _, _ = run(capsys, "batch", "--data", out, "--step", 1, "--global-batch", 4,
                     "--seq-len", 32, "--order", "sequential", "--vocab-size", 318,
                     "--out", tmp_path / "b.npy")
    assert code == 0 and np.load(tmp_path / "b.npy").shape == (4, 32)


def test_batch_and_locate_follow_a_runs_moved_rows(k2_dir, tmp_path, capsys):
    """--run-dir: the run's config.yaml and data_order.json decide the rows, not the flags."""
    import yaml

    from k2jax.config import load_config
    from train_utils import TINY

    assert run(capsys, "index", k2_dir, "--quiet")[0] == 0
    config = load_config(TINY, ["data.source=k2", f"data.path={k2_dir}",
                                f"data.seq_len={SEQ_LEN}", "data.global_batch_size=7",
                                "data.micro_batch_size=7"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (tmp_path / "data_order.json").write_text(json.dumps({"moved_row_ranges": [[24, 3]]}))
    original = [21, 22, 23, 27, 28, 29, 30]  # step 3 = logical rows 21..27, 24..26 moved away

    code, out, _ = run(capsys, "batch", "--run-dir", tmp_path, "--step", 3, "--out",
                       tmp_path / "b.npy")
    assert code == 0 and "after 1 moves" in out
    ref_tokens, _ = reference_rows(k2_dir, k2_stage1_chunk_order())
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), ref_tokens[original])

    code, out, _ = run(capsys, "locate", "--run-dir", tmp_path, "--step", 3)
    pieces = json.loads(out)["pieces"]
    got = np.load(tmp_path / "b.npy")
    assert code == 0 and [p["first_batch_row"] for p in pieces][0] == 0
    rows = [p["first_original_row"] + i for p in pieces for i in range(p["num_rows"])]
    assert rows == original and len(pieces) >= 3  # the move and a file boundary split it
    for piece in pieces:
        lines = range(piece["first_line_0based"], piece["end_line_0based_exclusive"])
        batch = got[piece["first_batch_row"]:piece["first_batch_row"] + piece["num_rows"]]
        assert batch[:, 0].tolist() == [piece["chunk_id"]] * len(lines)
        assert batch[:, 1].tolist() == list(lines)


@pytest.mark.parametrize("form", ["jsonl", "packed"])
def test_batch_says_how_many_rows_carry_a_target_mask(tmp_path, capsys, form):
    # Issue 26.2: stage-2 rows may carry tgt_mask; whether K2 applied it is unknown, so the
    # data commands say how many of a step's rows carry one, applied or not.
    data = tmp_path / "k2"
    data.mkdir()
    write_chunk(data, 0, 5, masked_lines=(1, 3))
    write_chunk(data, 1, 5, masked_lines=(0,))
    assert run(capsys, "index", data, "--quiet")[0] == 0
    if form == "packed":
        assert run(capsys, "pack", "--data", data, "--out", data, "--seq-len", SEQ_LEN,
                   "--quiet")[0] == 0
    common = ["--data", data, "--global-batch", 4, "--seq-len", SEQ_LEN, "--order", "0,1",
              "--format", form]
    code, out, _ = run(capsys, "batch", "--step", 0, *common, "--out", tmp_path / "b0.npy")
    assert code == 0 and "2 of 4 rows carry a tgt_mask" in out
    assert "ignored: data.use_tgt_mask false" in out
    code, out, _ = run(capsys, "batch", "--step", 1, *common, "--out", tmp_path / "b1.npy",
                       "data.use_tgt_mask=true")
    assert code == 0 and "1 of 4 rows carry a tgt_mask that leaves targets out (applied)" in out
