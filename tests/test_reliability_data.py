"""Issue 15, data: the packed form checks token ids against the vocabulary and refuses to serve
rows of a jsonl chunk that changed after packing; one line, exit 2."""

import json
import os

import numpy as np
import pytest

from data_fixtures import SEQ_LEN, reference_rows, write_chunk
from k2jax.cli import main

ORDER = "0,1,2"


@pytest.fixture
def packed_dir(tmp_path):
    """Three chunks, indexed and packed in place (the jsonl files beside their packed form)."""
    for chunk_id in range(3):
        write_chunk(tmp_path, chunk_id, 4)
    assert main(["data", "index", str(tmp_path), "--quiet"]) == 0
    assert main(["data", "pack", "--data", str(tmp_path), "--out", str(tmp_path), "--seq-len",
                 str(SEQ_LEN), "--quiet"]) == 0
    return tmp_path


def batch(capsys, data_dir, out, *extra):
    code = main(["data", "batch", "--data", str(data_dir), "--step", "0", "--global-batch", "4",
                 "--seq-len", str(SEQ_LEN), "--order", ORDER, "--out", str(out), *extra])
    _, err = capsys.readouterr()
    return code, err


def test_packed_rows_are_served_when_nothing_changed(packed_dir, tmp_path, capsys):
    code, err = batch(capsys, packed_dir, tmp_path / "b.npy", "--format", "packed")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"),
                                  reference_rows(packed_dir, [0, 1, 2])[0][:4])


@pytest.mark.parametrize("form", ["packed", "auto"])
def test_packed_token_ids_beyond_the_vocabulary_are_refused(packed_dir, tmp_path, capsys, form):
    """Before: ids up to 290 returned with --vocab-size 50, rc 0 (training logged NaN)."""
    code, err = batch(capsys, packed_dir, tmp_path / "b.npy", "--format", form,
                      "--vocab-size", "50")
    assert code == 2 and err.count("\n") == 1, err
    assert "chunk_0.packed.json: token ids up to" in err and "model.vocab_size=50" in err
    assert not (tmp_path / "b.npy").exists()


def _rewrite_first_line(directory, keep_size_and_mtime: bool):
    """Line 1 gets its token ids reversed (the same JSON length); optionally a longer source
    name too, else the old mtime is put back, so only the content tells."""
    path = directory / "chunk_0.jsonl"
    stat = path.stat()
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    row["token_ids"] = row["token_ids"][::-1]
    if not keep_size_and_mtime:
        row["source"] = "a longer source name"
    lines[0] = json.dumps(row) + "\n"
    path.write_text("".join(lines))
    if keep_size_and_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size
    return row["token_ids"]


@pytest.mark.parametrize("keep_size_and_mtime", [False, True],
                         ids=["size changed", "same size and mtime"])
def test_a_stale_packed_form_is_refused(packed_dir, tmp_path, capsys, keep_size_and_mtime):
    """Before: `data batch` (format auto) returned the old first row, rc 0."""
    first_row = _rewrite_first_line(packed_dir, keep_size_and_mtime)
    code, err = batch(capsys, packed_dir, tmp_path / "b.npy")
    assert code == 2 and err.count("\n") == 1, err
    assert "chunk_0.packed.json: packed from an older chunk_0.jsonl" in err
    # Packing again brings it up to date (the stale chunk is re-packed, not skipped).
    assert main(["data", "index", str(packed_dir), "--quiet"]) == 0
    assert main(["data", "pack", "--data", str(packed_dir), "--out", str(packed_dir),
                 "--seq-len", str(SEQ_LEN), "--quiet"]) == 0
    capsys.readouterr()
    code, err = batch(capsys, packed_dir, tmp_path / "b.npy", "--format", "packed")
    assert code == 0, err
    assert np.load(tmp_path / "b.npy")[0].tolist() == first_row


@pytest.mark.parametrize("where", ["missing directory", "onto a directory"])
def test_batch_out_that_cannot_be_written_is_one_line(packed_dir, tmp_path, capsys, where):
    out = tmp_path / "missing" / "b.npy" if where == "missing directory" else tmp_path / "adir"
    if where == "onto a directory":
        out.mkdir()
    code, err = batch(capsys, packed_dir, out)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out}: cannot be written" in err
    assert not list(tmp_path.glob("**/.*.tmp-*"))  # no temporary left behind
