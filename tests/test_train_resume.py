"""Exact resume after SIGKILL, interrupted checkpoints, and SIGTERM/Ctrl-C, in subprocesses."""

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from k2jax.train.trainer import Trainer
from train_utils import (assert_trees_equal, losses_by_step, read_metrics, restore_params_numpy,
                         run_train, small_config, subprocess_env, train_command)

pytestmark = pytest.mark.slow  # SIGKILL/SIGTERM of real training subprocesses: minutes


def committed_steps(run_dir) -> list[int]:
    directory = Path(run_dir) / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def wait_for(predicate, process, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out waiting for the trainer")


def start_train(run_dir, *extra):
    return subprocess.Popen(train_command(run_dir, *extra), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_resume_is_bitwise_identical(tmp_path):
    killed = tmp_path / "killed"
    # Checkpoints every 2 steps, asynchronously: the kill very likely lands mid-write.
    process = start_train(killed, "train.steps=100000", "train.checkpoint_every=2",
                          "train.keep_checkpoints=3")
    try:
        wait_for(lambda: len(committed_steps(killed)) >= 2, process)
        time.sleep(0.05)
    finally:
        process.kill()
        process.wait(timeout=60)
    # Whatever the kill interrupted, the latest committed checkpoint restores.
    resume_from = committed_steps(killed)[-1]
    final = resume_from + 6
    result = run_train(killed, f"train.steps={final}", "train.checkpoint_every=2",
                       "train.keep_checkpoints=3")
    assert result.returncode == 0, result.stderr[-2000:]

    reference = tmp_path / "reference"
    Trainer(small_config(reference, f"train.steps={final}", "train.checkpoint_every=2")).run()
    expected, got = losses_by_step(reference), losses_by_step(killed)
    assert [got[s] for s in range(1, final + 1)] == [expected[s] for s in range(1, final + 1)]
    assert_trees_equal(restore_params_numpy(killed, final), restore_params_numpy(reference, final))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    Trainer(small_config(tmp_path, "train.steps=4", "train.checkpoint_every=2")).run()
    state_dir = tmp_path / "checkpoints" / "4" / "state"
    for path in state_dir.rglob("*"):
        if path.is_file() and path.name != "_CHECKPOINT_METADATA":
            path.write_bytes(b"")  # a torn write: every data file truncated
    # An uncommitted temporary directory from a killed save is ignored too.
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" /
                    "6.orbax-checkpoint-tmp-123")
    trainer = Trainer(small_config(tmp_path, "train.steps=6", "train.checkpoint_every=2"))
    state, step = trainer.initial_state()
    assert step == 2 and int(state.step) == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_the_step_checkpoints_and_exits_zero(tmp_path, sig):
    process = start_train(tmp_path, "train.steps=100000", "train.checkpoint_every=100000")
    try:
        wait_for(lambda: len(read_metrics(tmp_path)) >= 3, process)
        process.send_signal(sig)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    stderr = process.stderr.read()
    assert "stop requested" in stderr
    last_logged = read_metrics(tmp_path)[-1]["step"]
    assert committed_steps(tmp_path) == [last_logged]
