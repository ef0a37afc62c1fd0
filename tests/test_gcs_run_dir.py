"""A run directory on gs://, against the local GCS protocol server (tests/gcs_server.py): the lock
object, the append-only logs, set-aside, a missing bucket, and (slow) training, kill -9 and
resume, two trainers, a save killed mid-way, init_from."""

import json
import re
import signal
import subprocess
import time

import numpy as np
import pytest

from k2jax.storage import gcs_objects, remote
from k2jax.errors import UserError

LEASE = "3"  # seconds: a killed trainer's lock goes stale quickly


def committed(server, run_url) -> list[int]:
    """Steps with Orbax's commit marker, read from the bucket (not through k2jax)."""
    names = server.list_objects(run_url + "/checkpoints/")
    prefix = run_url.split("/", 3)[3] + "/checkpoints/"
    return sorted(int(m.group(1)) for n in names
                  if (m := re.fullmatch(re.escape(prefix) + r"(\d+)/commit_success\.txt", n)))


# -- the lock object ---------------------------------------------------------------------------

def test_the_server_enforces_generation_preconditions(gcs_bucket):
    """What the lock relies on, checked on this server (not assumed): an exclusive create and a
    conditional rewrite (multipart uploads, as k2jax.storage.gcs_objects makes them)."""
    path = gcs_bucket + "/x/lock"
    first = gcs_objects.write(path, b"a", if_generation=0)
    with pytest.raises(FileExistsError):
        gcs_objects.write(path, b"b", if_generation=0)
    with pytest.raises(FileExistsError):
        gcs_objects.write(path, b"c", if_generation=first + 1)
    second = gcs_objects.write(path, b"d", if_generation=first)
    assert gcs_objects.read(path) == b"d" and second != first
    # This server ignores ifGenerationMatch on DELETE (real GCS honours it), so nothing here
    # relies on it: a holder that lost the lock never deletes it (next test).
    assert gcs_objects.delete(path, if_generation=second) and gcs_objects.stat(path) is None


def test_a_live_lock_refuses_a_second_holder_and_a_dead_one_goes_stale(gcs_server, gcs_bucket,
                                                                      monkeypatch):
    from k2jax.checkpoint.gcs_lock import GcsRunLock
    from k2jax.run_dir import RunDir

    monkeypatch.setenv("K2JAX_RUN_LOCK_LEASE_S", "1.2")
    run = RunDir(gcs_bucket + "/run")
    messages = []
    holder = GcsRunLock(run, log=messages.append)
    holder.acquire()
    record = json.loads(gcs_server.read_object(gcs_bucket + "/run/k2jax.lock"))
    assert record["lease_seconds"] == 1.2 and record["token"] == holder.token
    started = time.monotonic()
    with pytest.raises(UserError, match=r"is in use by host \S+ PID \d+ .*lock object "
                                        r"gs://.*/run/k2jax.lock$"):
        GcsRunLock(run, log=messages.append).acquire()
    assert time.monotonic() - started < 1.2  # refused at the holder's next heartbeat
    holder._stop.set()  # the holder "dies": no more heartbeats, the object stays
    holder._thread.join()
    newcomer = GcsRunLock(run, log=messages.append)
    newcomer.acquire()  # waits out the lease, then takes over
    assert any("took over the stale run_dir lock" in m for m in messages), messages
    with pytest.raises(FileExistsError):  # the old holder's next write is refused ...
        gcs_objects.write(holder.path, b"x", if_generation=holder._generation)
    newcomer.release()
    assert gcs_objects.stat(newcomer.path) is None


def test_a_holder_that_lost_the_lock_stops_at_its_next_check(gcs_bucket, monkeypatch):
    from k2jax.checkpoint.gcs_lock import GcsRunLock
    from k2jax.run_dir import RunDir

    monkeypatch.setenv("K2JAX_RUN_LOCK_LEASE_S", "0.8")
    lock = GcsRunLock(RunDir(gcs_bucket + "/run"), log=lambda m: None)
    lock.acquire()
    gcs_objects.write(lock.path, b'{"host": "other", "pid": 1, "started": "then"}')  # taken over
    time.sleep(0.8)
    with pytest.raises(UserError, match="this run lost its lock to host other PID 1"):
        lock.check()
    lock.release()
    assert json.loads(gcs_objects.read(lock.path))["host"] == "other"  # not deleted: not ours


# -- logs, set-aside, a missing bucket ---------------------------------------------------------

def test_logs_on_gcs_hold_whole_flushes_and_keep_their_past(gcs_server, gcs_bucket):
    from k2jax.train.metrics import MetricsWriter

    run = gcs_bucket + "/run"
    writer = MetricsWriter(run)
    writer.record(1, {"loss": 2.5})
    writer.flush()
    assert gcs_server.read_object(run + "/metrics.jsonl") == b'{"step": 1, "loss": 2.5}\n'
    writer.record(2, {"loss": 2.4})  # kept in memory until the next flush (no append on GCS)
    writer.spike({"step": 2, "kind": "loss"})
    writer.close()
    resumed = MetricsWriter(run)  # a resumed run adds to the same object
    resumed.record(3, {"loss": 2.3})
    resumed.close()
    lines = gcs_server.read_object(run + "/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(gcs_server.read_object(run + "/spikes.jsonl")) == {"step": 2, "kind": "loss"}
    events = sorted(n for n in gcs_server.list_objects(run) if "/tensorboard/events.out.tfevents."
                    in n)
    assert len(events) == 2 and not [n for n in gcs_server.list_objects(run) if ".part-" in n]

    from tensorboard.backend.event_processing.event_file_loader import (
        LegacyEventFileLoader as EventFileLoader)  # the events as written
    scalars = [(e.step, v.tag, v.simple_value)
               for e in EventFileLoader(f"{gcs_bucket}/{events[0]}").Load()
               for v in e.summary.value]
    assert (2, "loss", pytest.approx(2.4)) in scalars


def test_append_past_the_compose_limit_rewrites_the_log_whole(gcs_server, gcs_bucket,
                                                              monkeypatch):
    log = gcs_bucket + "/run/metrics.jsonl"
    gcs_objects.append_object(log, b"1\n", ".part")
    gcs_objects.append_object(log, b"2\n", ".part")  # composed
    monkeypatch.setattr(gcs_objects, "_MAX_COMPONENTS", 1)  # this server reports no componentCount
    gcs_objects.append_object(log, b"3\n", ".part")  # rewritten as one object
    assert gcs_server.read_object(log) == b"1\n2\n3\n"
    assert gcs_server.list_objects(gcs_bucket + "/run") == ["run/metrics.jsonl"]


def test_set_aside_on_gcs_copies_then_deletes_the_commit_marker_first(gcs_server, gcs_bucket):
    from k2jax.checkpoint.set_aside import set_aside_step
    from k2jax.run_dir import DAMAGED_DIR, RunDir

    run = RunDir(gcs_bucket + "/run")
    for name in ("commit_success.txt", "state/commit_success.txt", "state/data", "_META"):
        gcs_objects.write(f"{run.checkpoints_dir}/4/{name}", name.encode())
    target = set_aside_step(run.checkpoints_dir, 4, run.set_aside_dir(DAMAGED_DIR))
    again = (gcs_objects.write(f"{run.checkpoints_dir}/4/_META", b"x"),
             set_aside_step(run.checkpoints_dir, 4, run.set_aside_dir(DAMAGED_DIR)))[1]
    assert str(target).endswith("/run/damaged_checkpoints/4")
    assert str(again).endswith("/run/damaged_checkpoints/4-1")
    names = gcs_server.list_objects(gcs_bucket + "/run")
    assert sorted(names) == ["run/damaged_checkpoints/4-1/_META", "run/damaged_checkpoints/4/_META",
                             "run/damaged_checkpoints/4/commit_success.txt",
                             "run/damaged_checkpoints/4/state/commit_success.txt",
                             "run/damaged_checkpoints/4/state/data"]


def test_a_missing_bucket_is_one_line_naming_the_path(gcs_server, capsys):
    from k2jax.cli import main
    from train_utils import SMALL_MODEL, TINY

    code = main(["train", "--config", str(TINY), *SMALL_MODEL,
                 "train.run_dir=gs://no-such-bucket-k2jax/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("k2jax train: error: train.run_dir gs://no-such-bucket-k2jax/run:"
                                 " bucket gs://no-such-bucket-k2jax does not exist"), err


def test_a_missing_gcs_backend_is_one_line(monkeypatch):
    import sys

    from k2jax.run_dir import RunDir

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: import fails
    with pytest.raises(UserError, match=r"^gs://bucket/run: gs:// paths need the gcsfs package"):
        RunDir("gs://bucket/run").ensure()


# -- training on gs:// (subprocesses) ----------------------------------------------------------

def _env(**extra):
    from train_utils import subprocess_env

    return {**subprocess_env(), "K2JAX_RUN_LOCK_LEASE_S": LEASE, **extra}


def _k2jax() -> list[str]:
    import sys

    return [sys.executable, "-m", "k2jax.cli"]


def _start(run_url, *extra):
    from train_utils import train_command

    return subprocess.Popen(train_command(run_url, *extra), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(run_url, *extra):
    from train_utils import train_command

    return subprocess.run(train_command(run_url, *extra), env=_env(), timeout=300,
                          capture_output=True, text=True)


def _wait_for(predicate, process, timeout=180, poll=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early: {process.stderr.read()[-2000:]}")
        time.sleep(poll)
    process.kill()
    raise AssertionError("timed out waiting for the trainer")


def _kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def _losses(server, run_url) -> dict[int, float]:
    text = server.read_object(run_url + "/metrics.jsonl").decode()
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines())}


def _params(path: str):
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        item = epath.Path(path) / "state"
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                             sharding=one_device),
                              checkpointer.metadata(item).item_metadata)
        return jax.tree.map(np.asarray, checkpointer.restore(item, target)["params"])


@pytest.mark.slow  # three tiny trainings in subprocesses: ~2 min on 2 cores
def test_kill_9_on_gcs_then_resume_is_bitwise_identical_to_a_local_run(gcs_server, gcs_bucket,
                                                                       tmp_path):
    from train_utils import assert_trees_equal, losses_by_step, restore_params_numpy, run_train

    run = gcs_bucket + "/run"
    process = _start(run, "train.steps=100000", "train.checkpoint_every=2",
                     "train.keep_checkpoints=3")
    try:
        _wait_for(lambda: len(committed(gcs_server, run)) >= 2, process, poll=0.2)
    finally:
        _kill(process)
    resume_from = committed(gcs_server, run)[-1]
    final = resume_from + 4
    result = _run(run, f"train.steps={final}", "train.checkpoint_every=2",
                  "train.keep_checkpoints=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {resume_from}" in result.stderr
    assert "took over the stale run_dir lock" in result.stderr  # the killed run's lock
    names = gcs_server.list_objects(run)
    for name in ("config.yaml", "metrics.jsonl"):
        assert f"run/{name}" in names
    assert any(n.startswith("run/tensorboard/events.out.tfevents.") for n in names)
    assert "run/k2jax.lock" not in names  # released

    reference = tmp_path / "reference"
    local = run_train(reference, f"train.steps={final}", "train.checkpoint_every=2")
    assert local.returncode == 0, local.stderr[-2000:]
    expected, got = losses_by_step(reference), _losses(gcs_server, run)
    assert [got[s] for s in range(1, final + 1)] == [expected[s] for s in range(1, final + 1)]
    assert_trees_equal(_params(f"{run}/checkpoints/{final}"),
                       restore_params_numpy(reference, final))

    # train.init_from=gs://: the parameters of a gs:// step, into a fresh local run
    warm = _run(tmp_path / "warm", "train.steps=1", f"train.init_from={run}/checkpoints/{final}")
    assert warm.returncode == 0 and "initialised parameters from gs://" in warm.stderr, \
        warm.stderr[-2000:]


@pytest.mark.slow  # two trainers in subprocesses: ~40 s
def test_two_trainers_on_one_gcs_run_dir_one_is_refused(gcs_server, gcs_bucket):
    run = gcs_bucket + "/run"
    first = _start(run, "train.steps=100000", "train.checkpoint_every=1000")
    try:
        _wait_for(lambda: "run/k2jax.lock" in gcs_server.list_objects(run), first, poll=0.1)
        second = _run(run, "train.steps=2")
        assert first.poll() is None
    finally:
        _kill(first)
    assert second.returncode == 2, second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"k2jax train: error: train.run_dir {run} is in use by host \S+ PID "
                        rf"{first.pid} \(since \S+\); lock object {run}/k2jax.lock", last), last


@pytest.mark.slow  # a trainer killed inside a save, then resumed: ~1 min
def test_a_save_killed_mid_way_on_gcs_is_never_taken_as_complete(gcs_server, gcs_bucket):
    """Orbax on gs:// writes a step in place and its commit_success.txt last: kill the trainer
    while a step has objects but no marker, and that step must not be resumed from."""
    run = gcs_bucket + "/run"
    prefix = run.split("/", 3)[3] + "/checkpoints/"

    def partial_steps():
        names = gcs_server.list_objects(run + "/checkpoints/")
        steps = {int(n[len(prefix):].split("/")[0]) for n in names
                 if n[len(prefix):].split("/")[0].isdigit()}
        return sorted(steps - set(committed(gcs_server, run)))

    process = _start(run, "train.steps=100000", "train.checkpoint_every=1",
                     "train.keep_checkpoints=100")
    try:
        _wait_for(lambda: committed(gcs_server, run) and partial_steps(), process, poll=0.005)
    finally:
        _kill(process)
    partial, complete = partial_steps(), committed(gcs_server, run)
    assert partial, "the kill missed the save: nothing half-written to test"
    assert max(complete) < min(partial)
    result = _run(run, f"train.steps={min(partial) + 1}", "train.checkpoint_every=1",
                  "train.keep_checkpoints=100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {max(complete)}" in result.stderr, result.stderr[-3000:]
    assert min(partial) + 1 in committed(gcs_server, run)


@pytest.mark.slow  # index on gs://, three tiny trainings in subprocesses: ~2 min
def test_run_dir_and_data_on_gcs_kill_9_and_resume_equal_a_local_run(gcs_server, gcs_bucket,
                                                                     tmp_path):
    """The pod path: K2 chunk files and the run directory both on gs://."""
    from data_fixtures import write_chunk
    from k2jax.data.chunk_index import build_index
    from train_utils import assert_trees_equal, losses_by_step, restore_params_numpy, run_train

    local = tmp_path / "data"
    local.mkdir()
    for chunk in range(3):
        write_chunk(local, chunk, 200, seq_len=16)
    for path in local.iterdir():
        remote.filesystem()[0].put_file(str(path), f"{gcs_bucket[5:]}/data/{path.name}")
    index = subprocess.run([*_k2jax(), "data", "index", "--data", f"{gcs_bucket}/data",
                            "--quiet"], env=_env(), capture_output=True, text=True, timeout=120)
    assert index.returncode == 0, index.stderr[-2000:]
    build_index(str(local), progress=False)

    data = ["data.source=k2", "data.order=sequential", "model.vocab_size=1024"]
    run = gcs_bucket + "/run"
    process = _start(run, *data, f"data.path={gcs_bucket}/data", "train.steps=70",
                     "train.checkpoint_every=2")
    try:
        _wait_for(lambda: len(committed(gcs_server, run)) >= 2, process, poll=0.2)
    finally:
        _kill(process)
    resume_from = committed(gcs_server, run)[-1]
    final = resume_from + 4
    result = _run(run, *data, f"data.path={gcs_bucket}/data", f"train.steps={final}",
                  "train.checkpoint_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {resume_from}" in result.stderr

    reference = tmp_path / "reference"
    local_run = run_train(reference, *data, f"data.path={local}", f"train.steps={final}",
                          "train.checkpoint_every=2")
    assert local_run.returncode == 0, local_run.stderr[-2000:]
    expected, got = losses_by_step(reference), _losses(gcs_server, run)
    assert [got[s] for s in range(1, final + 1)] == [expected[s] for s in range(1, final + 1)]
    assert_trees_equal(_params(f"{run}/checkpoints/{final}"),
                       restore_params_numpy(reference, final))

    # The data commands follow the gs:// run: its config.yaml names the gs:// data.
    located = subprocess.run([*_k2jax(), "data", "locate", "--run-dir", run, "--step", "2"],
                             env=_env(), capture_output=True, text=True, timeout=120)
    assert located.returncode == 0, located.stderr[-2000:]
    assert [p["file"] for p in json.loads(located.stdout)["pieces"]] == [
        f"{gcs_bucket}/data/chunk_0.jsonl"]


@pytest.mark.slow  # two tiny trainings in subprocesses: ~1 min
def test_a_damaged_gcs_checkpoint_is_set_aside_and_the_run_resumes(gcs_server, gcs_bucket):
    run = gcs_bucket + "/run"
    first = _run(run, "train.steps=4", "train.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    bucket, prefix = run[5:].split("/", 1)
    shards = [n for n in gcs_server.list_objects(run + "/checkpoints/4/state/")
              if "/ocdbt.process_0/d/" in n]
    for name in shards:  # the step keeps its commit marker but lost its data
        assert gcs_objects.delete(f"gs://{bucket}/{name}")
    resumed = _run(run, "train.steps=6", "train.checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint 4 set aside as {run}/damaged_checkpoints/4" in resumed.stderr
    assert "resumed from step 2" in resumed.stderr
    names = gcs_server.list_objects(run)
    assert f"{prefix}/damaged_checkpoints/4/commit_success.txt" in names
    assert committed(gcs_server, run) == [4, 6]  # step 4 written anew
