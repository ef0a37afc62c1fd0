"""Two processes x 4 CPU devices on localhost (gloo collectives): the multi-host code paths of a
TPU pod (per-host batch slices, Orbax multi-host save/restore, process-0-only metrics).

Every wait is bounded and every process is reaped, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from train_utils import (REPO, losses_by_step, read_metrics, restore_state_numpy, subprocess_env,
                         train_command)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def device_env(devices: int, heartbeat_s: int = 10) -> dict:
    env = subprocess_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env["K2JAX_HEARTBEAT_TIMEOUT_S"] = str(heartbeat_s)
    return env


def launch(run_dir, *extra, processes=2, heartbeat_s=10, log_dir=None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for i in range(processes):
        cmd = train_command(run_dir, *extra, "--coordinator-address", f"127.0.0.1:{port}",
                            "--num-processes", str(processes), "--process-id", str(i))
        log = open(Path(log_dir or run_dir).with_suffix(f".p{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=device_env(8 // processes, heartbeat_s),
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def reap(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_all(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        reap(procs)


def logs(run_dir) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(Path(run_dir).parent.glob(
        Path(run_dir).name + ".p*.log")))


def test_two_processes_match_one_process_and_resume(tmp_path):
    reference = tmp_path / "ref"
    ref = subprocess.Popen(train_command(reference, "train.steps=4", "train.checkpoint_every=2"),
                           env=device_env(8),
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    multi = tmp_path / "multi"
    # Steps 1-2 and a checkpoint at 2, then a second launch resumes from it to step 4.
    codes = wait_all(launch(multi, "train.steps=2", "train.checkpoint_every=2"), 240)
    assert codes == [0, 0], logs(multi)
    assert checkpoint_steps(multi) == [2]
    after_two = restore_state_numpy(multi, 2)  # both hosts' shards, read back
    codes = wait_all(launch(multi, "train.steps=4", "train.checkpoint_every=2"), 240)
    assert codes == [0, 0], logs(multi)
    try:
        _, err = ref.communicate(timeout=240)
    finally:
        reap([ref])
    assert ref.returncode == 0, err[-3000:]

    want, got = losses_by_step(reference), losses_by_step(multi)
    assert sorted(got) == [1, 2, 3, 4] and sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=1e-5)
    # Only process 0 writes metrics: each step once per launch (2 + 2 lines, not 8).
    assert [m["step"] for m in read_metrics(multi)] == [1, 2, 3, 4]
    assert "resumed from step 2" in logs(multi)
    # Each checkpoint holds its step and the single-process run's params and AdamW moments
    # (every shard, whichever host wrote it); step 2 as the first launch left it.
    assert checkpoint_steps(multi) == checkpoint_steps(reference) == [2, 4]
    for step, state in ((2, after_two), (4, restore_state_numpy(multi, 4))):
        want = restore_state_numpy(reference, step)
        assert int(state["step"]) == int(want["step"]) == step
        assert_trees_close(state["params"], want["params"])
        assert_trees_close(state["opt_state"], want["opt_state"])
    assert_trees_close(restore_state_numpy(multi, 2), after_two, rtol=0)  # not rewritten


def checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def assert_trees_close(got, want, rtol=1e-5) -> None:
    import jax

    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree
    assert len(got_leaves) > 1
    for x, y in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7 if rtol else 0)


def test_dead_peer_ends_the_run(tmp_path):
    run_dir = tmp_path / "dead"
    procs = launch(run_dir, "train.steps=100000", "train.checkpoint_every=100000",
                   heartbeat_s=5)
    try:
        deadline = time.monotonic() + 180
        while not read_metrics(run_dir):  # both processes are training
            assert time.monotonic() < deadline, logs(run_dir)
            assert all(p.poll() is None for p in procs), logs(run_dir)
            time.sleep(0.5)
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=90)
        assert code != 0
        assert time.monotonic() - killed < 90
    finally:
        reap(procs)
