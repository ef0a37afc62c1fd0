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


@pytest.mark.parametrize("keep_size_and_mtime", [
    False, pytest.param(True, marks=pytest.mark.slow)],  # quick group time: ~3 s each
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


def _indexed(tmp_path):
    """Three indexed chunks (no packed form)."""
    tmp_path.mkdir(exist_ok=True)
    for chunk_id in range(3):
        write_chunk(tmp_path, chunk_id, 4)
    assert main(["data", "index", str(tmp_path), "--quiet"]) == 0
    return tmp_path


def _replace_with_directory(path):
    path.unlink()
    path.mkdir()


def _truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def _index_dir_is_a_file(data_dir):
    import shutil

    shutil.rmtree(data_dir / ".k2index")
    (data_dir / ".k2index").write_text("")


def _bool_token_id(data_dir):
    path = data_dir / "chunk_1.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[2])
    row["token_ids"][3] = True  # json.dumps writes `true`
    lines[2] = json.dumps(row) + "\n"
    path.write_text("".join(lines))
    assert main(["data", "index", str(data_dir), "--quiet"]) == 0


def _shift_lines_keeping_size_and_mtime(data_dir):
    """Line 1 one byte longer, line 2 one byte shorter (extra spaces moved): the file keeps its
    size and mtime, so only the line boundaries tell. Before: "malformed JSON"."""
    path = data_dir / "chunk_0.jsonl"
    stat = path.stat()
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace(", ", ",  ", 1)
    lines[1] = lines[1].replace(", ", ",", 1)
    path.write_text("".join(lines))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


# Case 9 and its relatives: (damage, command, text the one line must hold). Before: tracebacks
# (IsADirectoryError, numpy's "EOF: reading array header", FileExistsError), or rows served.
DAMAGED_DATA = {
    "chunk file is a directory (index)": (
        lambda d: (d / "chunk_7.jsonl").mkdir(), "index",
        "chunk_7.jsonl: is a directory, expected a file"),
    "chunk file is a directory (batch)": (
        lambda d: (d / "chunk_7.jsonl").mkdir(), "batch",
        "chunk_7.jsonl: is a directory, expected a file"),
    ".k2index is a file (index)": (
        _index_dir_is_a_file, "index", ".k2index: exists and is not a directory"),
    ".k2index is a file (batch)": (
        _index_dir_is_a_file, "batch", ".k2index: is a file, expected a directory holding "
                                       "chunk_0.json"),
    "offsets truncated in the header": (
        lambda d: _truncate(d / ".k2index" / "chunk_0.offsets.npy", 100), "batch",
        "chunk_0.offsets.npy: not a complete .npy array"),
    "offsets truncated in the data": (
        lambda d: _truncate(d / ".k2index" / "chunk_0.offsets.npy", 130), "batch",
        "chunk_0.offsets.npy: not a complete .npy array"),
    "offsets file is a directory": (
        lambda d: _replace_with_directory(d / ".k2index" / "chunk_0.offsets.npy"), "batch",
        "chunk_0.offsets.npy: not a complete .npy array"),
    "index manifest is a directory": (
        lambda d: _replace_with_directory(d / ".k2index" / "chunk_2.json"), "batch",
        "chunk_2.json: is a directory, expected a JSON file"),
    "stale index, same size and mtime": (
        _shift_lines_keeping_size_and_mtime, "batch",
        "chunk_0.jsonl:1: the line index is stale"),
    "bool token id": (_bool_token_id, "batch",
                      "chunk_1.jsonl:3: 'token_ids' holds true/false, expected integers"),
}


# Quick group time (~1.6 s each): these relatives of a quick case run in the slow group.
_SLOW_DAMAGE = {"chunk file is a directory (index)", ".k2index is a file (index)",
                "offsets truncated in the header", "offsets file is a directory",
                "index manifest is a directory", "bool token id"}


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.slow) if name in _SLOW_DAMAGE else name
    for name in DAMAGED_DATA], ids=list(DAMAGED_DATA))
def test_damaged_data_directory_is_one_line(tmp_path, capsys, case):
    damage, command, expected = DAMAGED_DATA[case]
    data_dir = _indexed(tmp_path / "data")
    damage(data_dir)
    capsys.readouterr()
    argv = (["data", "index", str(data_dir), "--quiet"] if command == "index" else
            ["data", "batch", "--data", str(data_dir), "--step", "0", "--global-batch", "8",
             "--seq-len", str(SEQ_LEN), "--order", "0,1,2" + (",7" if "chunk_7" in expected
                                                              else ""),
             "--out", str(tmp_path / "b.npy")])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert expected in err, err
    if ".k2index" in err:  # the index's files name the command that rewrites them
        assert "re-run `k2jax data index" in err or "--index-dir" in err, err
    assert not (tmp_path / "b.npy").exists()


def test_a_stale_index_message_is_a_way_out(tmp_path, capsys):
    """A file changed keeping its size and mtime: its manifest still matches, so `data index`
    alone skips it (before: the message said only "re-run `k2jax data index`", which changed
    nothing). Doing what the message says makes the batch readable again."""
    import re

    data_dir = _indexed(tmp_path / "data")
    _shift_lines_keeping_size_and_mtime(data_dir)
    argv = ["data", "batch", "--data", str(data_dir), "--step", "0", "--global-batch", "8",
            "--seq-len", str(SEQ_LEN), "--order", "0,1,2", "--out", str(tmp_path / "b.npy")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    remedy = re.search(r"delete (\S+) and re-run `k2jax data index (\S+)`", err)
    assert remedy and remedy.group(1).endswith("chunk_0.json"), err
    os.remove(remedy.group(1))
    assert main(["data", "index", remedy.group(2), "--quiet"]) == 0
    assert main(argv) == 0, capsys.readouterr().err


def test_bool_token_ids_are_refused_by_pack(tmp_path, capsys):
    """Before: JSON `true` packed as token id 1."""
    data_dir = _indexed(tmp_path)
    _bool_token_id(data_dir)
    capsys.readouterr()
    code = main(["data", "pack", "--data", str(data_dir), "--out", str(tmp_path / "p"),
                 "--seq-len", str(SEQ_LEN), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "chunk_1.jsonl:3: 'token_ids' holds true/false" in err, err


def _leftovers(directory):
    return sorted(p.name for p in directory.glob(".chunk_*.tmp-*"))


@pytest.mark.parametrize("command", ["pack", "index"])
def test_temporaries_of_a_killed_writer_are_removed_by_the_next(tmp_path, command):
    """A SIGKILLed `data pack` / `data index` leaves its `.chunk_*.tmp-*` files (gigabytes
    each at K2's scale); before, nothing ever removed them."""
    data_dir = _indexed(tmp_path / "data")
    out = tmp_path / "packed" if command == "pack" else data_dir / ".k2index"
    out.mkdir(exist_ok=True)
    names = [".chunk_0.tokens.u16.tmp-0123abcd", ".chunk_1.json.tmp-89ab4567"]
    for name in names:
        (out / name).write_bytes(b"partial")
    (out / ".notes.tmp-1").write_text("not ours")  # only k2jax's chunk temporaries go
    argv = (["data", "pack", "--data", str(data_dir), "--out", str(out), "--seq-len",
             str(SEQ_LEN), "--quiet"] if command == "pack" else
            ["data", "index", str(data_dir), "--quiet"])
    assert main(argv) == 0
    assert _leftovers(out) == [] and (out / ".notes.tmp-1").exists()


def test_temporaries_are_kept_while_another_writer_is_alive(tmp_path):
    """A pack that overlaps another into the same directory must not delete the other's
    temporaries: the live writer holds the shared lock, so no cleanup happens."""
    from k2jax.data import stale_temps
    from etils import epath

    data_dir = _indexed(tmp_path / "data")
    out = tmp_path / "packed"
    out.mkdir()
    with stale_temps.writing_into(epath.Path(out)) as removed:  # the other, live writer
        assert removed == []
        (out / ".chunk_0.tokens.u16.tmp-0123abcd").write_bytes(b"being written")
        assert main(["data", "pack", "--data", str(data_dir), "--out", str(out), "--seq-len",
                     str(SEQ_LEN), "--quiet"]) == 0
        assert _leftovers(out) == [".chunk_0.tokens.u16.tmp-0123abcd"]
    assert main(["data", "pack", "--data", str(data_dir), "--out", str(out), "--seq-len",
                 str(SEQ_LEN), "--quiet"]) == 0
    assert _leftovers(out) == []  # once alone, the next writer cleans up


def test_pack_with_nothing_left_to_do_on_a_read_only_directory(tmp_path, capsys):
    """The writers lock cannot be created there: a pack that writes nothing still succeeds."""
    from mounts import make_read_only, tmpfs

    data_dir = _indexed(tmp_path / "data")
    with tmpfs(tmp_path / "ro") as out:
        argv = ["data", "pack", "--data", str(data_dir), "--out", str(out), "--seq-len",
                str(SEQ_LEN), "--quiet"]
        assert main(argv) == 0
        make_read_only(out)
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
