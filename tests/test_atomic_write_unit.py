"""k2jax/atomic_write.py: an output appears whole or not at all, with the umask's modes."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest

from k2jax.atomic_write import (atomic_file, atomic_output_dir, write_json_atomic,
                                write_npy_atomic)
from k2jax.errors import UserError


def test_a_file_appears_only_when_its_block_ends(tmp_path):
    out = tmp_path / "rows.jsonl"
    with atomic_file(out, "w") as f:
        f.write("first\n")
        assert not out.exists()
        assert [p.name.startswith(".rows.jsonl.tmp-") for p in tmp_path.iterdir()] == [True]
    assert out.read_text() == "first\n"
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "manifest.json"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as f:
            f.write(b"half")
            raise RuntimeError("killed mid-write")
    assert out.read_text() == "old"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_a_full_disk_names_the_output(tmp_path):
    out = tmp_path / "tokens.u16"
    with pytest.raises(OSError) as err:
        with atomic_file(out):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.filename == str(out)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["missing/dir/out.json", "afile/out.json", "adir"])
def test_an_unwritable_path_is_one_user_error(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep").write_text("kept")
    with pytest.raises(UserError, match=f"{where}: cannot be written"):
        write_json_atomic(tmp_path / where, {"a": 1})
    assert (tmp_path / "adir" / "keep").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]


def test_json_and_npy_round_trip(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": 2, "a": [1]})
    assert (tmp_path / "m.json").read_text() == '{\n "a": [\n  1\n ],\n "b": 2\n}\n'
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1], "b": 2}
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    write_npy_atomic(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_of_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "f.json", {})
        with atomic_output_dir(tmp_path / "weights", force=False) as staging:
            (staging / "w").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "weights").stat().st_mode) == dir_mode


def test_an_output_directory_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "weights"
    with atomic_output_dir(out, force=False) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(UserError, match="output directory exists; force=True replaces it"):
        with atomic_output_dir(out, force=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as staging:
            (staging / "v").write_text("half")
            raise RuntimeError("killed")
    assert (out / "v").read_text() == "1" and os.listdir(tmp_path) == ["weights"]
    with atomic_output_dir(out, force=True) as staging:
        (staging / "v").write_text("2")
    assert (out / "v").read_text() == "2" and os.listdir(tmp_path) == ["weights"]
