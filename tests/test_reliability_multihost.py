"""Issue 15, multi-host preemption: a SIGTERM reaching ONE host stops every host at the same
step, with one complete checkpoint of that step (before: that host alone stopped and saved
while the other stepped on: a hang or a torn checkpoint)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from test_multihost import launch, logs, reap, wait_all
from train_utils import read_metrics

pytestmark = pytest.mark.slow


def committed_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


@pytest.mark.parametrize("signalled", [1, 0], ids=["non-primary host", "primary host"])
def test_sigterm_on_one_host_stops_all_hosts_at_the_same_step(tmp_path, signalled):
    run_dir = tmp_path / "run"
    procs = launch(run_dir, "train.steps=100000", "train.checkpoint_every=100000",
                   heartbeat_s=10)
    try:
        deadline = time.monotonic() + 240
        while len(read_metrics(run_dir)) < 2:  # both processes are stepping
            assert time.monotonic() < deadline, logs(run_dir)
            assert all(p.poll() is None for p in procs), logs(run_dir)
            time.sleep(0.2)
        os.kill(procs[signalled].pid, signal.SIGTERM)
        codes = wait_all(procs, 120)
    finally:
        reap(procs)
    assert codes == [0, 0], logs(run_dir)
    text = logs(run_dir)
    assert "stop requested" in text
    last_logged = read_metrics(run_dir)[-1]["step"]
    assert committed_steps(run_dir) == [last_logged]
