"""Issue 24: what a pod's log shows, and how a pod run ends.

- Off a terminal (`gcp/launch.sh` sends stderr to a file) `train` writes one newline-ended
  key=value line per logged step, never a `\\r` bar.
- A stop signal at any moment of start-up: exit 0, one line, the lock released.
- The cluster flags go together: one line, exit 2.
- Three failures print their one line and nothing after it (no Orbax/asyncio leftovers),
  every time: each is repeated 10 times, since the leftovers came in 30-80% of runs.
"""

from __future__ import annotations

import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from k2jax.checkpoint.run_lock import LOCK_NAME
from k2jax.cli import main
from k2jax.train.trainer import Trainer
from train_utils import read_metrics, small_config, subprocess_env, train_command

NOISE = ("Traceback", "Exception ignored", "Task exception", "TensorStore({", "ERROR:")
STEP_LINE = re.compile(r"^\[k2jax\] step=(\d+)/(\d+) loss=[\d.]+ lr=\S+ grad_norm=[\d.]+ "
                       r"tokens/s=\d+ mfu=[\d.]+% step_s=[\d.]+ eta=\S+$")


@pytest.mark.parametrize("flags", [
    ["--process-id", "5", "--num-processes", "2"],
    ["--num-processes", "2"],
    ["--coordinator-address", "127.0.0.1:1"],
    ["--coordinator-address", "127.0.0.1:1", "--process-id", "0"],
])
def test_cluster_flags_without_the_others_are_one_line(tmp_path, capsys, flags):
    code = main(["train", "--config", "tiny", f"train.run_dir={tmp_path / 'run'}", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("k2jax train: error: --") and "give all three" in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a training subprocess: ~15 s
def test_train_to_a_file_writes_one_line_per_logged_step(tmp_path):
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        result = subprocess.run(train_command(tmp_path / "run", "train.steps=6",
                                              "train.log_every=2"),
                                env=subprocess_env(), stderr=stderr, stdout=subprocess.DEVNULL,
                                timeout=300)
    text = log.read_bytes().decode()  # bytes: reading as text would turn \r into \n
    assert result.returncode == 0, text[-2000:]
    assert "\r" not in text and text.endswith("\n")
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, text.splitlines()) if m]
    assert steps == [2, 4, 6], text
    logged = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert logged == steps


@pytest.mark.slow  # a training subprocess: ~15 s
def test_progress_bar_can_be_asked_for_and_none_is_silent(tmp_path):
    def stderr_of(mode: str) -> str:  # bytes: text mode would turn the bar's \r into \n
        result = subprocess.run(train_command(tmp_path / mode, "train.steps=2", "--progress",
                                              mode), env=subprocess_env(), capture_output=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr.decode()

    bar = stderr_of("bar")
    assert "\r" in bar and "step=" not in bar
    none = stderr_of("none")
    assert "\r" not in none and "step=" not in none and "done at step 2" in none


def _start(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(train_command(run_dir, *extra), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _read_until(process, predicate, timeout=240) -> list[str]:
    """stderr lines up to and including the first that satisfies `predicate`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"exited early: {''.join(lines)[-2000:]}")
        lines.append(line)
        if predicate(line):
            return lines
    process.kill()
    raise AssertionError("timed out")


@pytest.mark.slow  # training subprocesses stopped during start-up: ~40 s
@pytest.mark.parametrize("when, line", [
    ("restoring", "resumed from step 2"),  # after the restore, before the compile
    ("compiling", "TensorBoard:"),  # the compile comes right after this line
])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_start_up_exits_zero_in_one_line(tmp_path, when, line, sig):
    run_dir = tmp_path / "run"
    Trainer(small_config(run_dir, "train.steps=2", "train.checkpoint_every=2")).run()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    process = _start(run_dir, "train.steps=100000", "train.checkpoint_every=2")
    try:
        _read_until(process, lambda text: line in text)
        process.send_signal(sig)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    rest = process.stderr.read().strip().splitlines()
    assert len(rest) == 1, rest
    assert rest[0] == (f"k2jax train: stopped by {sig.name} during start-up, before the first "
                       "step: nothing new to checkpoint"), rest
    assert not (run_dir / LOCK_NAME).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


# -- no leftovers after the one line, 10 runs each --------------------------------------------

REPEATS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    Trainer(small_config(run_dir, "train.steps=4", "train.checkpoint_every=2")).run()
    return run_dir


def _truncate_data_files(step_dir: Path) -> None:
    """Every array data file cut to half its length: a torn copy or write."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _assert_quiet(result, expected_code: int) -> str:
    assert result.returncode == expected_code, result.stderr[-3000:]
    for noise in NOISE:
        assert noise not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def _run(argv, **kwargs):
    return subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.slow  # 10 training subprocesses: ~2 min
def test_a_truncated_latest_checkpoint_recovers_without_leftovers(trained, tmp_path):
    for attempt in range(REPEATS):
        run_dir = tmp_path / str(attempt)
        shutil.copytree(trained, run_dir)
        _truncate_data_files(run_dir / "checkpoints" / "4")
        result = _run(train_command(run_dir, "train.steps=5", "train.checkpoint_every=2"))
        last = _assert_quiet(result, 0)
        assert "checkpoint 4 failed to restore" in result.stderr, result.stderr[-3000:]
        assert "resumed from step 2" in result.stderr and "done at step 5" in last


@pytest.mark.slow  # 10 training subprocesses: ~2 min
def test_resume_step_on_a_damaged_checkpoint_is_one_clean_line(trained, tmp_path):
    for attempt in range(REPEATS):
        run_dir = tmp_path / str(attempt)
        shutil.copytree(trained, run_dir)
        _truncate_data_files(run_dir / "checkpoints" / "2")
        result = _run(train_command(run_dir, "train.steps=6", "train.resume_step=2"))
        last = _assert_quiet(result, 2)
        assert last.startswith("k2jax train: error: train.resume_step=2: checkpoint "), last
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


@pytest.mark.slow  # 10 training subprocesses under a file-size limit: ~2 min
def test_a_full_disk_is_one_clean_line_every_time(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # below any checkpoint file

    for attempt in range(REPEATS):
        run_dir = tmp_path / str(attempt)
        result = _run(train_command(run_dir, "train.steps=2", "train.checkpoint_every=2"),
                      preexec_fn=limit)
        last = _assert_quiet(result, 2)
        assert last.startswith("k2jax train: error: file too large"), last
        assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow  # 10 training subprocesses writing to a 1 MiB tmpfs: ~2 min
def test_a_full_tmpfs_is_one_clean_line_every_time(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs privileges")
    try:
        for attempt in range(REPEATS):
            run_dir = mount_point / str(attempt)
            result = _run(train_command(run_dir, "train.steps=2", "train.checkpoint_every=2",
                                        "model.hidden_size=128", "model.intermediate_size=256"))
            last = _assert_quiet(result, 2)
            assert last.startswith("k2jax train: error: no space left on device"), last
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_abandoned_orbax_work_is_quiet_and_other_leftovers_are_not(caplog):
    """What Orbax leaves after a failed restore or save: a coroutine collected unfinished
    ('Exception ignored in: <coroutine object _read_array_index_and_device_put>') and a task
    whose exception nobody retrieved (asyncio's log record). Anything else still shows."""
    import logging
    import sys
    import types

    from k2jax.storage_errors import quiet_background_storage_errors

    async def _read_array_index_and_device_put():  # named like Orbax's
        pass

    orbax_code = _read_array_index_and_device_put.__code__.replace(
        co_filename="/venv/site-packages/orbax/checkpoint/_src/serialization/jax_array.py")
    orbax_coroutine = types.FunctionType(orbax_code, {})()
    other_coroutine = _read_array_index_and_device_put()
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with quiet_background_storage_errors():
            for coroutine in (orbax_coroutine, other_coroutine):
                sys.unraisablehook(types.SimpleNamespace(
                    exc_type=RuntimeError, exc_value=RuntimeError("x"), exc_traceback=None,
                    err_msg=None, object=coroutine))
            logging.getLogger("asyncio").error(
                "Task exception was never retrieved\nfuture: <Task finished coro=<_read() "
                "defined at /venv/site-packages/orbax/checkpoint/x.py:1>>")
            logging.getLogger("asyncio").error("Task exception was never retrieved: mine")
    finally:
        sys.unraisablehook = previous
        orbax_coroutine.close(), other_coroutine.close()
    assert [u.object for u in seen] == [other_coroutine]
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == [
        "Task exception was never retrieved: mine"]


@pytest.mark.parametrize("message, expected", [
    ("Error reading data file: truncated. See full TensorStore details: {...}",
     "ValueError: Error reading data file: truncated"),
    ("Error opening <bound method pybind11_object of TensorStore({\n  'driver': 'zarr'",
     "ValueError: Error opening"),
    ("Error reading TensorStore({\n  'context': {},\n  'driver': 'cast',",
     "ValueError: Error reading"),
    ("Error reading <TensorStore({'driver': 'cast'})>: DATA_LOSS", "ValueError: Error reading"),
])
def test_a_failed_restore_is_named_without_tensorstore_debris(message, expected):
    """The 'checkpoint N failed to restore (...)' line quotes the error's first line; a store's
    spec (many lines, and one of the leftovers these tests look for) is cut off wherever the
    message quotes it."""
    from k2jax.errors import one_line

    assert one_line(ValueError(message)) == expected
