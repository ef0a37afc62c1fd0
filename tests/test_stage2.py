"""K2's stage 2 (issue 19 point 1): the lr schedule setting, the k2-stage2 config, and a run
that continues at step 338760 on chunks 360..379 with its data position and schedule."""

from __future__ import annotations

import numpy as np
import pytest

from k2jax.config import load_config
from k2jax.data.chunk_index import build_index
from k2jax.data.loader import StepLoader
from k2jax.errors import ConfigError
from k2jax.train.schedule import k2_learning_rate, learning_rate
from k2jax.train.trainer import Trainer
from data_fixtures import reference_rows, write_chunk
from train_utils import REPO, TINY, read_metrics, record_batches_read, small_config

STAGE2 = REPO / "configs" / "k2-stage2.yaml"
STAGE1_END = 338760


def lrs(config, steps):
    return [float(learning_rate(config.optimizer)(s)) for s in steps]


def test_constant_and_linear_decay_warm_up_from_their_own_start():
    base = ["optimizer.peak_lr=1e-3", "optimizer.min_lr=1e-4", "optimizer.warmup_steps=10",
            "optimizer.schedule_start_step=100"]
    constant = load_config(TINY, base + ["optimizer.schedule=constant"])
    assert lrs(constant, [100, 105, 110, 5000]) == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    linear = load_config(TINY, base + ["optimizer.schedule=linear_decay",
                                       "optimizer.decay_steps=210"])
    assert lrs(linear, [100, 105, 110, 160, 210, 999]) == pytest.approx(
        [0.0, 5e-4, 1e-3, 5.5e-4, 1e-4, 1e-4])
    # k2 stays the default and K2's formula.
    k2 = load_config(TINY)
    assert k2.optimizer.schedule == "k2"
    assert lrs(k2, [0, 10, 150]) == [float(k2_learning_rate(k2.optimizer)(s))
                                     for s in (0, 10, 150)]


def test_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="optimizer.schedule_start_step"):
        load_config(TINY, ["optimizer.schedule_start_step=5"])  # k2 counts from step 0
    with pytest.raises(ConfigError, match="optimizer.decay_steps.*linear_decay"):
        load_config(TINY, ["optimizer.schedule=linear_decay", "optimizer.decay_steps=300",
                           "optimizer.schedule_start_step=290"])
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        load_config(TINY, ["optimizer.schedule=cosine"])
    with pytest.raises(ConfigError, match="data.first_step.*train.start_step"):
        load_config(TINY, ["data.first_step=10"])


def test_k2_stage2_config_continues_stage_1():
    config = load_config(STAGE2)
    assert config.data.order == "k2-stage2" and config.data.first_step == STAGE1_END
    assert config.train.start_step == STAGE1_END and config.train.steps == "auto"
    assert config.train.checkpoint_at_chunk_ends and not config.data.use_tgt_mask
    assert config.model.num_layers == 80  # K2's architecture from k2-65b.yaml
    assert config.optimizer.schedule == "constant"
    assert lrs(config, [STAGE1_END, STAGE1_END + 1, STAGE1_END + 100]) == pytest.approx(
        [0.0, 1.5e-7, 1.5e-5])


@pytest.mark.slow  # three tiny training runs
def test_stage2_step_338760_to_338761_continues_position_and_schedule(tmp_path, monkeypatch):
    data = tmp_path / "k2data"
    data.mkdir()
    for chunk in range(360, 380):  # chunk 360 ends inside step 338761
        write_chunk(data, chunk, 12 if chunk == 360 else 5)
    build_index(data, progress=False)
    seen = record_batches_read(monkeypatch)
    Trainer(small_config(tmp_path / "w", "model.vocab_size=1024", "train.steps=1",
                         "train.checkpoint_every=1")).run()
    stage2 = [  # K2's stage-2 settings as configured, on a tiny model and tiny chunk files
        "model.vocab_size=1024", "model.hidden_size=32", "model.intermediate_size=64",
        "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
        f"data.path={data}", "data.seq_len=8", "data.global_batch_size=8",
        "data.micro_batch_size=4", "train.checkpoint_every=1", "train.log_every=1",
        f"train.init_from={tmp_path / 'w' / 'checkpoints' / '1'}",
        f"train.run_dir={tmp_path / 'run'}", "train.peak_flops_per_device=1e11",
        "optimizer.warmup_steps=2"]
    config = load_config(STAGE2, stage2 + [f"train.steps={STAGE1_END + 1}"])
    seen.clear()
    Trainer(config).run()
    Trainer(load_config(STAGE2, stage2 + [f"train.steps={STAGE1_END + 2}"])).run()  # resumes

    rows, _ = reference_rows(data, list(range(360, 380)))
    assert sorted(seen) == [STAGE1_END, STAGE1_END + 1]
    np.testing.assert_array_equal(seen[STAGE1_END][-1], rows[0:8])  # chunk 360, lines 0..7
    np.testing.assert_array_equal(seen[STAGE1_END + 1][-1], rows[8:16])  # 360's rest, then 361
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [STAGE1_END + 1, STAGE1_END + 2]
    peak = config.optimizer.peak_lr
    assert [r["lr"] for r in records] == pytest.approx([0.0, peak / 2])  # its own warm-up
    assert StepLoader.from_config(config).logical_rows(STAGE1_END + 1) == (8, 16)


# -- issue 26.2: stage 2 sized by its data ----------------------------------------------------

TINY_STAGE2 = ["model.vocab_size=1024", "model.hidden_size=32", "model.intermediate_size=64",
               "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
               "data.seq_len=8", "data.global_batch_size=8", "data.micro_batch_size=4",
               "train.peak_flops_per_device=1e11"]


def stage2_data(tmp_path, rows_after_360=5):
    data = tmp_path / "k2data"
    data.mkdir()
    for chunk in range(360, 380):  # 12 + 19 x 5 = 107 rows: 13 whole steps of 8
        write_chunk(data, chunk, 12 if chunk == 360 else rows_after_360)
    build_index(data, progress=False)
    return data


def test_auto_steps_end_with_the_data_and_too_many_are_refused_before_any_state(
        tmp_path, monkeypatch):
    data = stage2_data(tmp_path)
    given = TINY_STAGE2 + [f"data.path={data}", f"train.run_dir={tmp_path / 'run'}",
                           f"train.init_from={tmp_path / 'weights'}"]
    logged = []
    monkeypatch.setattr(Trainer, "log", lambda self, message: logged.append(message))
    trainer = Trainer(load_config(STAGE2, given))
    assert trainer.config.train.steps == STAGE1_END + 107 // 8
    assert any("train.steps auto: 338773" in m and "107 rows" in m for m in logged)

    def no_state(*args, **kwargs):
        raise AssertionError("the training state was set up before the data check")

    monkeypatch.setattr("k2jax.train.trainer.build_training_setup", no_state)
    too_many = load_config(STAGE2, given + [f"train.steps={STAGE1_END + 20 * 941}"])
    with pytest.raises(ConfigError, match=r"^config key 'train.steps': 357580 is past the "
                                          r"data: the data holds 107 rows = steps up to 338773"):
        Trainer(too_many)
    synthetic = small_config(tmp_path / "s", "train.steps=auto")
    with pytest.raises(ConfigError, match="train.steps.*auto needs data with an end"):
        Trainer(synthetic)


def test_a_step_ends_a_chunk_when_the_next_step_starts_in_another_file(tmp_path):
    from k2jax.train.data_span import ends_chunk

    loader = StepLoader.from_config(load_config(STAGE2, TINY_STAGE2 + [
        f"data.path={stage2_data(tmp_path, rows_after_360=20)}"]))
    # Chunk 360 holds rows 0..11, 361 rows 12..31, 362 rows 32..51, ...: step 338760 + u reads
    # rows 8u..8u+7, and ends a file when row 8u+8 lies in another file than row 8u.
    ends = [u for u in range(12) if ends_chunk(loader, STAGE1_END + u)]
    assert ends == [1, 3, 6, 8, 11]


@pytest.mark.slow  # a tiny training run of 10 steps
def test_checkpoints_at_chunk_ends(tmp_path):
    config = small_config(tmp_path, "train.steps=10", "train.checkpoint_every=100",
                          "train.keep_checkpoints=10", "train.checkpoint_at_chunk_ends=true",
                          "data.synthetic_chunk_rows=20")
    Trainer(config).run()
    # Files of 20 rows, 8 rows a step: steps 2, 4, 7 and 9 end in the next file.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [3, 5, 8, 10]
