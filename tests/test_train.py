"""The training recipe and loop, in process on one CPU device."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import load_config
from k2jax.errors import UserError
from k2jax.train.optimizer import make_optimizer
from k2jax.train.schedule import k2_learning_rate
from k2jax.train.setup import build_training_setup
from k2jax.train.trainer import Trainer
from train_utils import (TINY, assert_trees_equal, losses_by_step, read_metrics,
                         record_batches_read, restore_params_numpy, small_config)


def k2_formula(step):
    peak, low, warmup, decay = 1.5e-4, 1.5e-5, 2000, 338760
    if step <= warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (decay - warmup), 1.0)
    return low + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - low)


@pytest.mark.parametrize("step", [0, 1, 1000, 2000, 2001, 170000, 338760, 400000])
def test_learning_rate_matches_k2(step):
    config = load_config(TINY.parent / "k2-65b.yaml")
    lr = float(k2_learning_rate(config.optimizer)(step))
    assert lr == pytest.approx(k2_formula(step), rel=1e-5, abs=1e-12)


def test_weight_decay_skips_norm_scales():
    config = small_config("unused")
    optimizer = make_optimizer(config.optimizer, scanned_layers=True)
    params = {"layers": {"input_norm": {"scale": jnp.ones((2, 4))},
                         "mlp": {"up_proj": jnp.ones((2, 4, 4))}},
              "final_norm": {"scale": jnp.ones(4)}, "lm_head": jnp.ones((4, 4))}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # Zero gradients: only weight decay moves a parameter, so only matrices move.
    assert float(jnp.abs(updates["layers"]["input_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["layers"]["mlp"]["up_proj"]).max()) == 0.0  # lr(0) = 0
    updates, _ = optimizer.update(grads, optimizer.init(params), params)


def one_step(config, batch):
    setup = build_training_setup(config)
    state, step = setup.init_state(), setup.step
    state, metrics = step(state, batch, np.float32(np.inf))
    state, metrics = step(state, batch, np.float32(np.inf))  # lr(0) = 0: take a second step
    return state, jax.device_get(metrics)


@pytest.mark.slow
def test_micro_batch_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 128, (8, 16)), jnp.int32),
             "loss_mask": jnp.asarray((rng.random((8, 16)) > 0.2).astype(np.float32))}
    whole, m1 = one_step(small_config("unused", "data.micro_batch_size=8"), batch)
    split, m4 = one_step(small_config("unused", "data.micro_batch_size=2"), batch)
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(split.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)  # Adam: g/sqrt(v)


@pytest.mark.slow  # 2 x 30 training steps: ~20 s idle
def test_two_runs_are_bitwise_identical_and_loss_falls(tmp_path):
    for name in ("a", "b"):
        Trainer(small_config(tmp_path / name, "train.steps=30",
                            "train.checkpoint_every=30")).run()
    losses_a, losses_b = losses_by_step(tmp_path / "a"), losses_by_step(tmp_path / "b")
    assert list(losses_a) == list(range(1, 31))
    assert losses_a == losses_b  # exact float equality
    assert losses_a[30] < 0.5 * losses_a[1]
    assert_trees_equal(restore_params_numpy(tmp_path / "a", 30),
                       restore_params_numpy(tmp_path / "b", 30))


@pytest.mark.slow  # quick group time (~6 s; resume and data-order tests stay quick)
def test_the_trainer_reads_each_steps_batch_once(tmp_path, monkeypatch):
    """The step compiles from shapes, so no step is read for compiling; a resumed run reads
    from its checkpoint's step on, each step once."""
    reads = record_batches_read(monkeypatch)
    Trainer(small_config(tmp_path, "train.steps=3", "train.checkpoint_every=3")).run()
    assert {step: len(seen) for step, seen in reads.items()} == {0: 1, 1: 1, 2: 1}
    reads.clear()
    Trainer(small_config(tmp_path, "train.steps=5", "train.checkpoint_every=3")).run()
    assert {step: len(seen) for step, seen in reads.items()} == {3: 1, 4: 1}


def test_metrics_jsonl_and_tensorboard(tmp_path):
    Trainer(small_config(tmp_path, "train.steps=3", "train.checkpoint_every=3")).run()
    records = read_metrics(tmp_path)
    for field in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "param_norm",
                  "update_ratio", "step_seconds"):
        assert field in records[-1], field
    assert [r["step"] for r in records] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "param_norm", "update_ratio", "tokens_per_s", "mfu",
            "step_seconds", "compile_seconds"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_checkpoint_from_an_incompatible_config_is_refused(tmp_path):
    Trainer(small_config(tmp_path, "train.steps=2", "train.checkpoint_every=2")).run()
    with pytest.raises(UserError, match=r"model.hidden_size .*data.seq_len"):
        Trainer(small_config(tmp_path, "train.steps=4", "model.hidden_size=64",
                            "data.seq_len=32")).run()


@pytest.mark.slow
def test_resume_step_and_init_from(tmp_path):
    Trainer(small_config(tmp_path / "a", "train.steps=4", "train.checkpoint_every=2",
                        "train.keep_checkpoints=5")).run()
    with pytest.raises(UserError, match="resume_step=3"):
        Trainer(small_config(tmp_path / "a", "train.steps=6", "train.resume_step=3")).run()
    # init_from accepts a training checkpoint step directory: parameters only, step 0.
    trainer = Trainer(small_config(tmp_path / "b", "train.steps=1",
                                  f"train.init_from={tmp_path / 'a' / 'checkpoints' / '2'}"))
    state, step = trainer.initial_state()
    assert step == 0 and int(state.step) == 0
    assert_trees_equal(state.params, restore_params_numpy(tmp_path / "a", 2))
    # ... and a run directory: its latest complete step (4), as --checkpoint does.
    state, _ = Trainer(small_config(tmp_path / "c", "train.steps=1",
                                    f"train.init_from={tmp_path / 'a'}")).initial_state()
    assert_trees_equal(state.params, restore_params_numpy(tmp_path / "a", 4))


@pytest.mark.slow  # two training runs: ~18 s idle
def test_resume_from_an_earlier_step_sets_the_newer_checkpoints_aside(tmp_path):
    """train.resume_step=2 on a run that reached 4: steps 3-4 are trained again (equal to the
    first time: a batch is a function of the step) and the old checkpoint 4 is kept under
    superseded_checkpoints/ instead of blocking the new save (Orbax: step already exists)."""
    extra = ("train.checkpoint_every=2", "train.keep_checkpoints=5")
    Trainer(small_config(tmp_path, "train.steps=4", *extra)).run()
    first = losses_by_step(tmp_path)
    Trainer(small_config(tmp_path, "train.steps=5", "train.resume_step=2", *extra)).run()
    assert (tmp_path / "superseded_checkpoints" / "4").is_dir()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 5]
    again = losses_by_step(tmp_path)
    assert again[3] == first[3] and again[4] == first[4]


def spikes(run_dir):
    path = Path(run_dir) / "spikes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


POISON_STEP = 25  # rows of step 25 (batch 8) become uniform random tokens


def poisoned(run_dir, action, kind="random", steps=28, *extra):
    rows = f"data.synthetic_poison_rows=[[{POISON_STEP * 8}, 8]]"
    return small_config(run_dir, f"train.steps={steps}", "train.checkpoint_every=10",
                       "train.keep_checkpoints=5", f"train.spikes.action={action}",
                       "train.spikes.min_history=5", "train.spikes.threshold=1.5", rows,
                       f"data.synthetic_poison_kind={kind}", *extra)


@pytest.mark.slow
def test_spike_skip_refuses_the_update(tmp_path):
    Trainer(poisoned(tmp_path, "skip")).run()
    events = spikes(tmp_path)
    assert [(e["step"], e["kind"], e["update_applied"]) for e in events] == [
        (POISON_STEP, "ratio", False)]
    assert POISON_STEP + 1 not in losses_by_step(tmp_path)  # the refused step is not logged
    # The logged lr is the one the update used: the refused update did not advance the
    # schedule, so record s (update s - 1) ran at lr(s - 1) before the spike, lr(s - 2) after.
    lr = k2_learning_rate(poisoned(tmp_path, "skip").optimizer)
    for record in read_metrics(tmp_path):
        used = record["step"] - (1 if record["step"] <= POISON_STEP else 2)
        assert record["lr"] == pytest.approx(float(lr(used)), rel=1e-6), record["step"]


@pytest.mark.slow
def test_spike_rollback_moves_the_rows_and_restores(tmp_path):
    Trainer(poisoned(tmp_path, "rollback", "random", 28, "train.spikes.rollback_unit=step")).run()
    [event] = spikes(tmp_path)
    assert event["moved_rows"] == [POISON_STEP * 8, 8]
    assert event["resumed_from_step"] == 20  # last checkpoint before the spike
    assert json.loads((tmp_path / "data_order.json").read_text())["moved_row_ranges"] == [
        [POISON_STEP * 8, 8]]
    losses = losses_by_step(tmp_path)
    assert max(losses) == 28 and all(math.isfinite(v) for v in losses.values())


@pytest.mark.slow
def test_non_finite_updates_are_refused_and_never_checkpointed(tmp_path):
    trainer = Trainer(poisoned(tmp_path, "log", kind="nonfinite", steps=30))
    trainer.run()
    [event] = spikes(tmp_path)
    assert (event["kind"], event["update_applied"]) == ("nonfinite", False)
    params = restore_params_numpy(tmp_path, 30)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))

    # A state whose parameters went non-finite is never written.
    trainer = Trainer(poisoned(tmp_path / "nan", "log", steps=1))
    state, _ = trainer.initial_state()
    state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    trainer.save(1, state, {"param_norm": float("nan")})
    trainer.checkpoints.wait()
    assert trainer.checkpoints.all_steps() == []


@pytest.mark.slow
def test_relative_run_dir_works_from_any_directory(tmp_path, monkeypatch):
    """The README's main job uses `runs/tiny`; Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    Trainer(small_config("runs/relative", "train.steps=2", "train.checkpoint_every=1")).run()
    assert sorted(p.name for p in (tmp_path / "runs/relative/checkpoints").iterdir()) == ["1", "2"]
