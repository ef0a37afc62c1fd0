"""Issue 15, training: damaged checkpoints set aside, one run per run_dir, nothing written before
the config check, non-finite numbers refused, bad inputs one line (exit 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from k2jax.checkpoint.run_lock import LOCK_NAME, RunDirLock
from k2jax.errors import ConfigError, UserError
from k2jax.train.trainer import Trainer
from train_utils import (losses_by_step, restore_params_numpy, run_train, small_config)


def steps_on_disk(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (copied by each test that damages it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    Trainer(small_config(run_dir, "train.steps=4", "train.checkpoint_every=2")).run()
    return run_dir


def copy_run(trained, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def _truncate_every_state_file(step_dir):
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.name != "_CHECKPOINT_METADATA":
            path.write_bytes(b"")


def _delete_one_data_file(step_dir):
    # The largest holds array data; the small ones are B-tree nodes the merged root no longer
    # needs (deleting one of those leaves a checkpoint that restores bit-exactly).
    files = (step_dir / "state" / "ocdbt.process_0" / "d").iterdir()
    max(files, key=lambda p: p.stat().st_size).unlink()


DAMAGE = {
    "one ocdbt data file deleted": _delete_one_data_file,
    "state files truncated": _truncate_every_state_file,
    "state/ deleted": lambda d: shutil.rmtree(d / "state"),
    "garbage config/metadata": lambda d: (d / "config" / "metadata").write_text("{garbage"),
    "manifest.ocdbt deleted": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
}


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_latest_checkpoint_is_set_aside(trained, tmp_path, damage):
    run_dir = copy_run(trained, tmp_path)
    DAMAGE[damage](run_dir / "checkpoints" / "4")
    trainer = Trainer(small_config(run_dir, "train.steps=6", "train.checkpoint_every=2"))
    state, step = trainer.initial_state()
    assert step == 2 and int(state.step) == 2
    # Renamed, not deleted, and out of the way of the step number.
    assert steps_on_disk(run_dir) == [2] and trainer.checkpoints.all_steps() == [2]
    assert (run_dir / "damaged_checkpoints" / "4" / "_CHECKPOINT_METADATA").exists()


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_after_setting_aside_training_goes_on_and_saves_that_step_again(trained, tmp_path):
    """The issue's case: before, every retry retrained 3-4 and died on StepAlreadyExistsError."""
    run_dir = copy_run(trained, tmp_path)
    _delete_one_data_file(run_dir / "checkpoints" / "4")
    (run_dir / "damaged_checkpoints" / "4").mkdir(parents=True)  # an earlier casualty
    Trainer(small_config(run_dir, "train.steps=6", "train.checkpoint_every=2",
                         "train.keep_checkpoints=3")).run()
    assert steps_on_disk(run_dir) == [2, 4, 6]
    assert (run_dir / "damaged_checkpoints" / "4-1" / "state").exists()
    losses, first = losses_by_step(run_dir), losses_by_step(trained)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert [losses[s] for s in (3, 4)] == [first[s] for s in (3, 4)]  # retrained from step 2


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_when_no_checkpoint_restores_nothing_is_moved(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    for step in (2, 4):
        _truncate_every_state_file(run_dir / "checkpoints" / str(step))
    trainer = Trainer(small_config(run_dir, "train.steps=6", "train.checkpoint_every=2"))
    with pytest.raises(UserError, match="no checkpoint in .* restores"):
        trainer.initial_state()
    assert steps_on_disk(run_dir) == [2, 4] and not (run_dir / "damaged_checkpoints").exists()


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_resume_step_on_a_damaged_checkpoint_is_one_line(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    _truncate_every_state_file(run_dir / "checkpoints" / "2")
    trainer = Trainer(small_config(run_dir, "train.steps=6", "train.resume_step=2"))
    with pytest.raises(UserError, match=r"train.resume_step=2: checkpoint .*/2 cannot be "
                                        r"restored \(\w+"):
        trainer.initial_state()
    assert steps_on_disk(run_dir) == [2, 4]  # asked for by name: refused, not moved


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_refused_resume_writes_nothing(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    config_yaml = (run_dir / "config.yaml").read_text()
    with pytest.raises(UserError, match="different config.*train.seed"):
        Trainer(small_config(run_dir, "train.steps=6", "train.seed=5")).run()
    assert (run_dir / "config.yaml").read_text() == config_yaml
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


# -- one run per run_dir -------------------------------------------------------------------------


def test_run_dir_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    with RunDirLock(tmp_path / "run"):
        holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"is in use by host \S+ PID {os.getpid()} "):
            RunDirLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    with RunDirLock(tmp_path / "run"):  # and free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": os.uname().nodename, "pid": int(dead.stdout), "started": "earlier"}))
    with RunDirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_second_trainer_on_a_locked_run_dir_exits_2_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        result = run_train(run_dir, "train.steps=2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"PID {os.getpid()}" in lines[0] and "in use" in lines[0]
    assert list(run_dir.iterdir()) == []  # wrote nothing (no empty checkpoints/ either)


# -- bad input: one line, exit 2 ----------------------------------------------------------------


def _make_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


RUN_DIR_CASES = {
    "run_dir is a file": (_make_file, "not a directory"),
    "run_dir under a file": (lambda t: _make_file(t) / "run", "not a directory"),
}


@pytest.mark.parametrize("case", RUN_DIR_CASES, ids=list(RUN_DIR_CASES))
def test_unusable_run_dir_is_one_line(tmp_path, case):
    make, message = RUN_DIR_CASES[case]
    result = run_train(make(tmp_path), "train.steps=2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.run_dir" in lines[0] and message in lines[0], lines


# -- non-finite numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["optimizer.peak_lr=inf", "optimizer.peak_lr=.nan",
                                      "model.rope_theta=-.inf", "train.spikes.threshold=1e999"])
def test_non_finite_config_numbers_are_refused(tmp_path, override):
    with pytest.raises(ConfigError, match=rf"'{override.split('=')[0]}': expected a finite"):
        small_config(tmp_path, override)


@pytest.mark.slow  # a training run: ~11 s idle
def test_a_non_finite_update_is_refused_and_reported(tmp_path):
    """peak_lr 1e39 is a finite config number but inf in float32: loss and gradient stay
    finite, the update does not. Before: applied, param_norm NaN, exit 0."""
    Trainer(small_config(tmp_path, "train.steps=2", "train.checkpoint_every=2",
                         "optimizer.peak_lr=1e39", "optimizer.min_lr=0")).run()
    events = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["update_applied"]) for e in events] == [("nonfinite", False)] * 2
    params = restore_params_numpy(tmp_path, 2)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


CONFIG_CASES = {
    "train.keep_period=0": ("train.keep_period", "must be positive or null"),
    "mesh.rules.embed=bogus": ("mesh.rules.embed", "'bogus' is not a mesh axis"),
    "mesh.rules.batch=[data, nowhere]": ("mesh.rules.batch", "'nowhere' is not a mesh axis"),
}


@pytest.mark.parametrize("override", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config_values_name_their_key(tmp_path, override):
    key, message = CONFIG_CASES[override]
    with pytest.raises(ConfigError, match=rf"'{key}': {message}"):
        small_config(tmp_path, override)


def _data_order(text):
    return lambda run_dir: (run_dir / "data_order.json").write_text(text)


DATA_ORDER_CASES = {
    "not json": (_data_order("{\"moved_row_ranges\": [[1,"), "not a k2jax data order record"),
    "no key": (_data_order("{}"), "not a k2jax data order record"),
    "negative start": (_data_order('{"moved_row_ranges": [[-8, 8]]}'),
                       r"moved_row_ranges\[0\] must be \[start >= 0, count > 0\]"),
    "bool count": (_data_order('{"moved_row_ranges": [[8, true]]}'),
                   r"moved_row_ranges\[0\] must be"),
}


@pytest.mark.parametrize("case", DATA_ORDER_CASES, ids=list(DATA_ORDER_CASES))
def test_a_damaged_data_order_record_is_one_line(tmp_path, case):
    damage, message = DATA_ORDER_CASES[case]
    tmp_path.mkdir(exist_ok=True)
    damage(tmp_path)
    with pytest.raises(UserError, match=rf"data_order.json: {message}"):
        Trainer(small_config(tmp_path, "train.steps=2"))


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_init_from_with_other_shapes_names_the_tensor_in_one_line(trained, tmp_path):
    """Before: exit 2 but under ~10 'Event loop is closed' tracebacks, no tensor named."""
    result = run_train(tmp_path / "run", "train.steps=1", "model.hidden_size=64",
                       f"train.init_from={trained / 'checkpoints' / '2'}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert "tensor ['params']['embed_tokens'] has shape (128, 32), the model config expects (128, 64)" \
        in lines[0]


def test_process_id_out_of_range_is_one_line(tmp_path):
    result = run_train(tmp_path, "train.steps=1", "--coordinator-address", "127.0.0.1:1",
                       "--num-processes", "2", "--process-id", "5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "k2jax train: error: --process-id 5: expected 0 <= id < --num-processes (2)"]


@pytest.mark.slow  # the module's trained run: ~18 s idle to build
def test_a_resume_with_another_rope_theta_is_refused(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    trainer = Trainer(small_config(run_dir, "train.steps=6", "model.rope_theta=500000"))
    with pytest.raises(UserError, match=r"model.rope_theta \(checkpoint 10000.0, now 500000.0\)"):
        trainer.initial_state()


def test_one_mesh_rule_override_keeps_the_other_rules(tmp_path):
    """Before: `mesh.rules.embed=...` replaced the whole table, and the error blamed 'vocab'."""
    rules = small_config(tmp_path, "mesh.rules.embed=tensor").mesh.rules
    assert rules["embed"] == "tensor" and rules["vocab"] == "tensor" and len(rules) == 10
