"""Issue 15, full disks: a file-size limit (RLIMIT_FSIZE, what `ulimit -f` sets; a small tmpfs
would need mount privileges CI does not have) makes every write past it fail with EFBIG, the
same path through the code as ENOSPC. Expected: one line naming the problem and the file,
exit 2, nothing complete-looking left half-written, and the next run after lifting the limit
works."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from data_fixtures import SEQ_LEN, write_chunk
from k2jax.storage_errors import storage_failure
from train_utils import REPO, subprocess_env, train_command

PROBLEM = "file too large (the file system's or `ulimit -f` limit) writing "


def limited(argv, max_bytes, timeout=600):
    """Runs `argv` in a subprocess that may write no file beyond `max_bytes`."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return subprocess.run(argv, env=subprocess_env(), cwd=REPO, preexec_fn=limit,
                          capture_output=True, text=True, timeout=timeout)


def k2jax(*argv):
    return [sys.executable, "-m", "k2jax.cli", *map(str, argv)]


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("text, expected", [
    (OSError(28, "No space left on device", "/data/x"), "no space left on device writing /data/x"),
    (ValueError('Error writing "a" at local file "/ckpt/2.tmp/": Failed writing: "/ckpt/2.tmp/d/f"'
                ": Failed to write 9 bytes to file 6: No space left on device "
                "[os_error_code='28']"), "no space left on device writing /ckpt/2.tmp/d/f"),
    (RuntimeError("wrapped"), None),
])
def test_storage_failures_are_recognised_through_library_errors(text, expected):
    assert storage_failure(text) == expected
    if expected:  # and as the cause of another error
        try:
            try:
                raise text
            except Exception as inner:
                raise RuntimeError("outer") from inner
        except RuntimeError as outer:
            assert storage_failure(outer) == expected


@pytest.mark.slow  # k2jax subprocesses under a file-size limit: ~5 s idle
def test_data_index_on_a_full_disk(tmp_path):
    write_chunk(tmp_path, 0, 3000)  # offsets: 8 bytes a line, past the 8 KiB limit
    result = limited(k2jax("data", "index", tmp_path, "--quiet"), 8192)
    line = one_error_line(result)
    assert line.startswith("k2jax data index: error: " + PROBLEM) and ".k2index" in line
    index_files = [p.name for p in (tmp_path / ".k2index").iterdir()]
    assert not [n for n in index_files if "chunk_0" in n], index_files  # nothing, not even a temp
    ok = limited(k2jax("data", "index", tmp_path, "--quiet"), resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.slow  # k2jax subprocesses under a file-size limit: ~6 s idle
def test_convert_on_a_full_disk(tmp_path):
    from convert_fixtures import hf_config, hf_state, tiny_hf_model, write_hf_dir

    model = tiny_hf_model()
    write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    out = tmp_path / "weights"
    argv = k2jax("convert", "hf-to-orbax", "--hf", tmp_path / "hf", "--out", out,
                 "--no-progress")
    line = one_error_line(limited(argv, 16384))
    assert line.startswith("k2jax convert hf-to-orbax: error: " + PROBLEM)
    assert not out.exists()
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert out.is_dir()


@pytest.mark.slow
def test_train_on_a_full_disk_then_after_freeing_space(tmp_path):
    """The last line names the problem, exit 2, and nothing else in stderr is an error (before:
    Orbax's background threads logged 4 tracebacks and TensorStore ~35 'Event loop is closed'
    ones first); no checkpoint looks complete, and the next run trains."""
    run_dir = tmp_path / "run"
    argv = train_command(run_dir, "train.steps=2", "train.checkpoint_every=2")
    result = limited(argv, 100_000)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("k2jax train: error: " + PROBLEM + str(run_dir)), last
    for noise in ("Traceback", "ERROR:", "Event loop is closed", "Exception"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (run_dir / "checkpoints" / "2" / "state").is_dir()
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 1, 2]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (a real ENOSPC), where mounting is allowed (root); skipped elsewhere."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs privileges")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_data_index_on_a_full_tmpfs(tmp_path, small_tmpfs):
    write_chunk(tmp_path, 0, 20000)  # 160 KB of offsets into 64 KiB
    argv = k2jax("data", "index", tmp_path, "--index-dir", small_tmpfs / "index", "--quiet")
    line = one_error_line(limited(argv, resource.RLIM_INFINITY))
    assert line.startswith("k2jax data index: error: no space left on device writing " +
                           str(small_tmpfs / "index"))
    assert not [p for p in (small_tmpfs / "index").iterdir() if "chunk_0" in p.name]


def _log_storage_failure_from_a_thread():
    """What Orbax's background save threads do: log the failure with its traceback."""
    import logging

    try:
        raise ValueError('OUT_OF_RANGE: Error writing "x" in OCDBT database: Failed writing: '
                         '"/run/checkpoints/2.orbax-checkpoint-tmp/d/ab": Failed to write 9 '
                         "bytes to file 6: File too large [os_error_code='27']")
    except ValueError:
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception",
                                        exc_info=True)


def _unraisable(exc):
    import types

    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                 err_msg=None, object=None)


def test_background_storage_failures_are_quiet_and_nothing_else_is(caplog):
    """Before: every Orbax thread logged the failure with a traceback, and TensorStore writes
    finishing after the failed save's event loop closed printed 'Event loop is closed'
    tracebacks (49 in all), before the one-line error."""
    import logging

    from k2jax.storage_errors import quiet_background_storage_errors

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with quiet_background_storage_errors() as background:
            _log_storage_failure_from_a_thread()
            logging.getLogger("absl").error("an unrelated error stays visible")
            sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
            sys.unraisablehook(_unraisable(RuntimeError("something else")))
    finally:
        sys.unraisablehook = previous
    assert [r.getMessage() for r in caplog.records] == ["an unrelated error stays visible"]
    assert [str(u.exc_value) for u in seen] == ["something else"]
    assert background.first_problem == (
        PROBLEM + "/run/checkpoints/2.orbax-checkpoint-tmp/d/ab")
    _log_storage_failure_from_a_thread()  # outside the block, logged as before
    assert len(caplog.records) == 2 and caplog.records[-1].exc_info


def test_a_storage_failure_a_library_only_logged_still_fails_the_command(monkeypatch, capsys):
    """A command that returns 0 after a background thread logged a full disk exits 2 with the
    one line: the quiet log must not turn a failure into a success."""
    from k2jax import cli
    from k2jax.commands import compare_curves

    def logs_and_succeeds(args):
        _log_storage_failure_from_a_thread()
        return 0

    monkeypatch.setattr(compare_curves, "run", logs_and_succeeds)
    code = cli.main(["compare-curves", "--run", "r", "--reference", "x.csv"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("k2jax compare-curves: error: " + PROBLEM +
                                 "/run/checkpoints/2.orbax-checkpoint-tmp/d/ab"), err


@pytest.fixture(scope="module")
def orbax_weights(tmp_path_factory):
    from convert_fixtures import write_converted_tiny_model

    return write_converted_tiny_model(tmp_path_factory.mktemp("weights"))


# (direction, file-size limit): 2000 bytes stops hf-to-orbax in Orbax's background metadata
# write (before: its traceback, then the line, ending "writing ?") and orbax-to-hf in the
# safetensors header; 40000 stops them mid-tensor.
@pytest.mark.parametrize("direction, limit", [("hf-to-orbax", 2000), ("orbax-to-hf", 2000),
                                              ("orbax-to-hf", 40000)])
@pytest.mark.slow  # k2jax subprocesses under a file-size limit: ~6 s each idle
def test_convert_both_ways_on_a_full_disk(orbax_weights, tmp_path, direction, limit):
    out = tmp_path / "out"
    source = (["--hf", orbax_weights / "hf"] if direction == "hf-to-orbax" else
              ["--checkpoint", orbax_weights / "weights"])
    argv = k2jax("convert", direction, *source, "--out", out, "--no-progress")
    line = one_error_line(limited(argv, limit))
    assert line.startswith(f"k2jax convert {direction}: error: " + PROBLEM + str(tmp_path)), line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing looks complete
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert out.is_dir()


@pytest.mark.slow  # k2jax subprocesses under a file-size limit: ~9 s each idle
@pytest.mark.parametrize("workers", [1, 2])
def test_data_pack_on_a_full_disk(tmp_path, workers):
    """Before: '... writing ?' (a write to an open file names no path)."""
    data = tmp_path / "data"
    data.mkdir()
    for chunk_id in range(2):
        write_chunk(data, chunk_id, 300)  # 4.8 KB of tokens per chunk, past the 2000 bytes
    assert limited(k2jax("data", "index", data, "--quiet"), resource.RLIM_INFINITY).returncode == 0
    out = tmp_path / "packed"
    argv = k2jax("data", "pack", "--data", data, "--out", out, "--seq-len", SEQ_LEN, "--quiet",
                 "--workers", workers)
    line = one_error_line(limited(argv, 2000))
    assert line.startswith("k2jax data pack: error: " + PROBLEM + str(out)), line
    assert sorted(p.name for p in out.iterdir()) == []  # no temporaries, no lock file
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "chunk_1.packed.json").is_file()


def test_metrics_on_a_full_disk_name_the_file_and_leave_no_half_line(tmp_path):
    """Before: 'file too large ... writing ?', and the half-written record stayed at the end of
    metrics.jsonl, where the resumed run's first record was glued to it."""
    import errno

    from k2jax.errors import UserError
    from k2jax.train.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    writer.record(1, {"loss": 2.5})

    class FullDisk:
        def write(self, text):  # what a buffered file does at the limit: part, then EFBIG
            with open(tmp_path / "metrics.jsonl", "a") as f:
                f.write(text[:7])
            raise OSError(errno.EFBIG, "File too large")

        def flush(self):
            pass

        close = flush

    writer._jsonl = FullDisk()
    with pytest.raises(UserError, match=f"file too large .* writing {tmp_path}/metrics.jsonl$"):
        writer.record(2, {"loss": 2.4})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text().endswith('\n{"step"')  # the half line
    resumed = MetricsWriter(str(tmp_path))
    resumed.record(2, {"loss": 2.4})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


@pytest.mark.slow  # k2jax subprocesses under a file-size limit: ~6 s idle
def test_data_prepare_on_a_full_disk(tmp_path):
    """Before: '... writing ?', and the spool directory `.prepare-spool` was left behind (the
    cleanup's own flush failed first and hid the error)."""
    from test_data_prepare import train_tiny_spm

    sentences = train_tiny_spm(tmp_path)
    (tmp_path / "docs.txt").write_text(" ".join(sentences) * 3)  # ~70 KB of rows into 3000 B
    out = tmp_path / "out"
    argv = k2jax("data", "prepare", "--tokenizer", tmp_path / "tok.model", "--input",
                 tmp_path / "docs.txt", "--out", out, "--num-chunks", 2, "--seq-len", 16,
                 "--quiet")
    line = one_error_line(limited(argv, 3000))
    assert line == "k2jax data prepare: error: " + PROBLEM + str(out), line
    assert not out.exists()  # no spool, no half chunk: the --out it made is gone too
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".k2index", "chunk_0.jsonl",
                                                     "chunk_1.jsonl", "prepare.json"]
