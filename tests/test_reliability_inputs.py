"""Issue 15, case 7's rest, case 8's read-only run_dir, and their relatives: a damaged reference
CSV, inputs of the wrong kind (a directory given as a file, a binary file given as text) and a
run_dir on a read-only file system give one line naming the file (and line), exit 2."""

from __future__ import annotations

import builtins
import errno
import os

import pytest

from k2jax.cli import main
from mounts import make_read_only, tmpfs
from train_utils import SMALL_MODEL, TINY


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def run_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "loss": {3 - 0.1 * s}}}\n' for s in range(1, 6)))
    return tmp_path / "metrics.jsonl"


# (CSV text, what the one line must hold). Before: rows with a bad cell were dropped and the
# comparison ran on the rest (rc 0 or 1).
BAD_CSV_ROWS = {
    "loss not a number": ("Step,loss\n1,2.9\n2,2.8\n3,oops\n4,2.6\n", "ref.csv:4: ", "'oops'"),
    "step not a number": ("Step,loss\n1,2.9\nthree,2.7\n", "ref.csv:3: ", "'three'"),
    "step not whole": ("Step,loss\n1,2.9\n2.5,2.7\n", "ref.csv:3: ", "'2.5'"),
    "row too short": ("Step,loss\n1,2.9\n2\n", "ref.csv:3: ", "fewer cells"),
}


@pytest.mark.parametrize("case", BAD_CSV_ROWS, ids=list(BAD_CSV_ROWS))
def test_compare_curves_names_the_bad_csv_row(tmp_path, capsys, run_metrics, case):
    text, *expected = BAD_CSV_ROWS[case]
    (tmp_path / "ref.csv").write_text(text)
    err = one_line_error(capsys, ["compare-curves", "--run", run_metrics, "--reference",
                                  tmp_path / "ref.csv"])
    for needle in expected:
        assert needle in err, err


def test_compare_curves_still_skips_empty_loss_cells(tmp_path, capsys, run_metrics):
    """W&B exports leave the loss empty at steps that logged only other metrics."""
    (tmp_path / "ref.csv").write_text("Step,loss,lr\n1,2.9,1\n2,,1\n3,2.7,1\n2.0,2.8,1\n")
    assert main(["compare-curves", "--run", str(run_metrics), "--reference",
                 str(tmp_path / "ref.csv"), "--json"]) in (0, 1)
    assert '"common_steps": 3' in capsys.readouterr().out


def _binary(path):
    path.write_bytes(bytes(range(128, 256)) * 4)
    return path


# Relatives of case 9 on other inputs: (argv builder, text the line must hold). Before: the
# CSV / metrics / config / tokenizer cases said "no such file" / "not found" for a directory,
# and binary files were UnicodeDecodeError tracebacks.
def _wrong_kind_inputs(tmp_path, run_metrics):
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    ok_csv = tmp_path / "ok.csv"
    ok_csv.write_text("Step,loss\n1,2.9\n")
    return {
        "reference CSV is a directory": (
            ["compare-curves", "--run", run_metrics, "--reference", a_dir],
            f"--reference {a_dir}: a directory without metrics.jsonl (expected a W&B CSV"),
        "reference CSV is binary": (
            ["compare-curves", "--run", run_metrics, "--reference", _binary(tmp_path / "b.csv")],
            "b.csv: not a UTF-8 text file"),
        "run metrics are binary": (
            ["compare-curves", "--run", _binary(tmp_path / "m.jsonl"), "--reference", ok_csv],
            "m.jsonl: not a UTF-8 text file"),
        "config file is a directory": (
            ["train", "--config", a_dir], f"config file {a_dir}: is a directory"),
        "tokenizer is a directory": (
            ["data", "prepare", "--tokenizer", a_dir, "--input", ok_csv, "--out",
             tmp_path / "out"], f"{a_dir}: no tokenizer files in this directory"),
    }


CASES = ["reference CSV is a directory", "reference CSV is binary", "run metrics are binary",
         "config file is a directory", "tokenizer is a directory"]


@pytest.mark.parametrize("case", CASES)
def test_inputs_of_the_wrong_kind(tmp_path, capsys, run_metrics, case):
    argv, expected = _wrong_kind_inputs(tmp_path, run_metrics)[case]
    assert expected in one_line_error(capsys, argv)


def test_unreadable_input_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """An OSError naming a path (no permission: root ignores chmod, so it is raised here) that
    no check anticipated is still one line naming the path, not a traceback."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 1}\n")
    real_read_text = type(config).read_text

    def refuse(path, *args, **kwargs):
        if str(path) == str(config):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(type(config), "read_text", refuse)
    assert one_line_error(capsys, ["train", "--config", config]).endswith(
        f"error: {config}: permission denied")


def _train_argv(run_dir):
    return ["train", "--config", TINY, *SMALL_MODEL, f"train.run_dir={run_dir}", "train.steps=1"]


@pytest.fixture
def read_only_fs(tmp_path):
    """A real read-only file system (a tmpfs remounted ro) where mounting is allowed."""
    with tmpfs(tmp_path / "ro") as mount_point:
        (mount_point / "run").mkdir()
        make_read_only(mount_point)
        yield mount_point


@pytest.fixture
def simulated_read_only(tmp_path, monkeypatch):
    """Every create under tmp_path/ro fails with EROFS, as on a read-only mount (for machines
    where mounting is not allowed)."""
    root = tmp_path / "ro"
    (root / "run").mkdir(parents=True)

    def read_only(path, write: bool = True):
        if write and os.path.abspath(os.fspath(path)).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: read_only(p) or real_mkdir(p, *a, **k))
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: read_only(
        p, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) or real_os_open(p, flags, *a, **k))
    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: read_only(
        p, any(c in mode for c in "wax+")) or real_open(p, mode, *a, **k))
    return root


@pytest.mark.parametrize("run_dir_name", ["run", "run/new"], ids=["exists", "to be created"])
@pytest.mark.parametrize("fs", ["simulated_read_only", "read_only_fs"])
def test_train_on_a_read_only_run_dir(request, capsys, fs, run_dir_name):
    root = request.getfixturevalue(fs)
    run_dir = root / run_dir_name
    err = one_line_error(capsys, _train_argv(run_dir))
    assert "read-only file system" in err.lower() and str(root / "run") in err, err


def _wrong_kind_in_place(directory, name, kind):
    """`directory/name` made a directory (kind 'dir') or a plain file (kind 'file')."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "dir":
        (directory / name).mkdir()
    else:
        (directory / name).write_text("x")
    return directory


def _truncated_model_json(weights):
    (weights / "k2jax_model.json").write_text('{"vocab_size": 128, "hidden_si')
    return weights


# Files k2jax reads or writes inside a directory the user gives, replaced by the wrong kind of
# thing (or truncated). Before: IsADirectoryError / FileExistsError / JSONDecodeError
# tracebacks, rc 1. Now the CLI's net, or the reader, names the path.
IN_PLACE = {
    "weights' k2jax_model.json is a directory": (
        lambda t: ["convert", "orbax-to-hf", "--checkpoint",
                   _wrong_kind_in_place(t / "w", "params", "dir") and
                   _wrong_kind_in_place(t / "w", "k2jax_model.json", "dir"), "--out", t / "o"],
        "w/k2jax_model.json: is a directory, expected a JSON file"),
    "weights' k2jax_model.json truncated": (
        lambda t: ["convert", "orbax-to-hf", "--checkpoint",
                   _wrong_kind_in_place(t / "w", "params", "dir") and
                   _truncated_model_json(t / "w"), "--out", t / "o"],
        "w/k2jax_model.json: not valid JSON"),
    "run_dir's config.yaml is a directory (data batch --run-dir)": (
        lambda t: ["data", "batch", "--run-dir", _wrong_kind_in_place(t / "r", "config.yaml",
                                                                      "dir"),
                   "--step", "0", "--out", t / "b.npy"],
        "r/config.yaml: is a directory, expected a file"),
    "run_dir's metrics.jsonl is a directory (train)": (
        lambda t: _train_argv(_wrong_kind_in_place(t / "r", "metrics.jsonl", "dir")),
        "r/metrics.jsonl: is a directory, expected a file"),
    "run_dir's tensorboard is a file (train)": (
        lambda t: _train_argv(_wrong_kind_in_place(t / "r", "tensorboard", "file")),
        "r/tensorboard: exists and is not a directory"),
}


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case, marks=[pytest.mark.slow] if "(train)" in case else [])
    for case in IN_PLACE])  # train's cases build the model first (~25 s each on 2 cores)
def test_files_of_the_wrong_kind_inside_given_directories(tmp_path, capsys, case):
    make_argv, expected = IN_PLACE[case]
    assert expected in one_line_error(capsys, make_argv(tmp_path))
