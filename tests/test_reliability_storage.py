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
from pathlib import Path

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


def test_data_index_on_a_full_disk(tmp_path):
    write_chunk(tmp_path, 0, 3000)  # offsets: 8 bytes a line, past the 8 KiB limit
    result = limited(k2jax("data", "index", tmp_path, "--quiet"), 8192)
    line = one_error_line(result)
    assert line.startswith("k2jax data: error: " + PROBLEM) and ".k2index" in line
    index_files = [p.name for p in (tmp_path / ".k2index").iterdir()]
    assert not [n for n in index_files if "chunk_0" in n], index_files  # nothing, not even a temp
    ok = limited(k2jax("data", "index", tmp_path, "--quiet"), resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_convert_on_a_full_disk(tmp_path):
    from convert_fixtures import hf_config, hf_state, tiny_hf_model, write_hf_dir

    model = tiny_hf_model()
    write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    out = tmp_path / "weights"
    argv = k2jax("convert", "hf-to-orbax", "--hf", tmp_path / "hf", "--out", out,
                 "--no-progress")
    line = one_error_line(limited(argv, 16384))
    assert line.startswith("k2jax convert: error: " + PROBLEM)
    assert not out.exists()
    ok = limited(argv, resource.RLIM_INFINITY)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert out.is_dir()


@pytest.mark.slow
def test_train_on_a_full_disk_then_after_freeing_space(tmp_path):
    """The last line names the problem (exit 2; Orbax's background threads still log their
    own tracebacks before it), no checkpoint looks complete, and the next run trains."""
    run_dir = tmp_path / "run"
    argv = train_command(run_dir, "train.steps=2", "train.checkpoint_every=2")
    result = limited(argv, 100_000)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("k2jax train: error: " + PROBLEM + str(run_dir)), last
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
    assert line.startswith("k2jax data: error: no space left on device writing " +
                           str(small_tmpfs / "index"))
    assert not [p for p in (small_tmpfs / "index").iterdir() if "chunk_0" in p.name]
