"""Megatron's schedule details, continuing K2's run at train.start_step, and rollback by chunk
as K2's team did it (issue 13, points 6-8)."""

import json
import shutil

import numpy as np
import pytest

from k2jax.cli import main
from k2jax.config import DataConfig, load_config
from k2jax.data.chunked_source import ChunkedRowSource
from k2jax.data.order import RowMap
from k2jax.data.loader import StepLoader
from k2jax.data.rollback import rollback_window
from k2jax.data.synthetic import SyntheticSource
from k2jax.errors import ConfigError
from k2jax.train.schedule import k2_learning_rate
from k2jax.train.trainer import Trainer
from train_utils import (TINY, assert_trees_equal, losses_by_step, read_metrics,
                         record_batches_read, restore_params_numpy, small_config)

pytestmark = pytest.mark.slow  # several tiny training runs


@pytest.fixture
def batches_read(monkeypatch):
    return record_batches_read(monkeypatch)


def synthetic_rows(config, start, count):
    source = SyntheticSource(config.model.vocab_size, config.data.seq_len, config.train.seed)
    return source.read_rows(np.arange(start, start + count))[0]


# -- 6: the schedule's small print ------------------------------------------------------------


def test_warmup_zero_runs_step_0_at_peak():
    config = load_config(TINY, ["optimizer.warmup_steps=0", "optimizer.decay_steps=100"])
    lr = k2_learning_rate(config.optimizer)
    assert float(lr(0)) == pytest.approx(config.optimizer.peak_lr, rel=1e-6)
    assert float(lr(50)) == pytest.approx(0.5 * (config.optimizer.peak_lr
                                                 + config.optimizer.min_lr), rel=1e-6)
    # With a warm-up the first update still runs at 0 and the warm-up ends exactly at peak.
    warm = k2_learning_rate(load_config(TINY).optimizer)
    assert float(warm(0)) == 0.0
    assert float(warm(20)) == pytest.approx(load_config(TINY).optimizer.peak_lr, rel=1e-6)


# -- 7: continue K2's run from released weights -----------------------------------------------


def test_start_step_needs_init_from_and_a_step_before_the_end():
    with pytest.raises(ConfigError, match="train.start_step.*needs train.init_from"):
        load_config(TINY, ["train.start_step=100"])
    with pytest.raises(ConfigError, match=r"train.start_step.*\[0, train.steps=300\)"):
        load_config(TINY, ["train.start_step=300", "train.init_from=w"])
    k2 = load_config(TINY.parent / "k2-65b.yaml", ["train.init_from=weights/ckpt_100",
                                                   "train.start_step=94100"])
    assert float(k2_learning_rate(k2.optimizer)(94100)) == pytest.approx(1.266e-4, rel=1e-3)


@pytest.mark.slow
def test_start_step_continues_lr_rows_and_numbering_and_resumes_exactly(tmp_path,
                                                                         batches_read):
    Trainer(small_config(tmp_path / "w", "train.steps=1", "train.checkpoint_every=1")).run()
    weights = tmp_path / "w" / "checkpoints" / "1"
    batches_read.clear()
    start = 40
    cont = [f"train.init_from={weights}", f"train.start_step={start}", "train.steps=44",
            "train.checkpoint_every=1", "train.keep_checkpoints=10"]
    config = small_config(tmp_path / "b", *cont)
    Trainer(config).run()

    # Rows: the first step read is step 40, global rows [40 * 8, 41 * 8).
    assert min(batches_read) == start
    np.testing.assert_array_equal(batches_read[start][0], synthetic_rows(config, start * 8, 8))
    # Numbering and the logged lr: step 41 is the first record, at lr(40).
    records = read_metrics(tmp_path / "b")
    lr = k2_learning_rate(config.optimizer)
    assert [r["step"] for r in records] == [41, 42, 43, 44]
    assert [r["lr"] for r in records] == pytest.approx([float(lr(s)) for s in range(40, 44)])
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [41, 42, 43, 44]
    # The update used lr(40): Adam's first step (fresh moments, count 1) is g / (|g| + eps),
    # about sign(g), so the norm scales (no weight decay) moved by lr(40), a few of them with
    # tiny gradients by less (lr(39) and lr(41) differ from lr(40) by 0.5%).
    moved = np.abs(np.asarray(restore_params_numpy(tmp_path / "b", 41)["final_norm"]["scale"])
                   - np.asarray(restore_params_numpy(tmp_path / "w", 1)["final_norm"]["scale"]))
    assert np.median(moved) == pytest.approx(float(lr(start)), rel=1e-4)
    assert moved.max() <= float(lr(start)) * (1 + 1e-4)

    # Resume from checkpoint 42 (a copy of the run without 43, 44): exactly the same steps.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    for step in ("43", "44"):
        shutil.rmtree(tmp_path / "c" / "checkpoints" / step)
    (tmp_path / "c" / "metrics.jsonl").unlink()
    resumed = small_config(tmp_path / "c", *cont)
    Trainer(resumed).run()
    b, c = losses_by_step(tmp_path / "b"), losses_by_step(tmp_path / "c")
    assert sorted(c) == [43, 44] and [c[s] for s in (43, 44)] == [b[s] for s in (43, 44)]
    assert_trees_equal(restore_params_numpy(tmp_path / "b", 44),
                       restore_params_numpy(tmp_path / "c", 44))


# -- 8: rollback by chunk, and the data CLI following the run's order -------------------------


def test_rollback_window_is_the_rest_of_the_chunk_in_the_current_order():
    # Three files of 10, 12 and 11 rows at global rows [0, 10), [10, 22), [22, 33).
    source = ChunkedRowSource(RowMap([5, 7, 9], [10, 12, 11]), reader=None, seq_len=8)
    data = DataConfig(source="k2", path="x", global_batch_size=4, micro_batch_size=4)
    batches = StepLoader(source, data)
    assert rollback_window(batches, 3, "step") == [12, 4]
    assert rollback_window(batches, 3, "chunk") == [12, 10]  # rows 12..21 of file 7
    # An earlier move cut rows 14..16 out of file 7: the rest of it in the current order is
    # original rows 12, 13, 17..21 (7 rows), which stand at logical rows 12..18.
    cut = StepLoader(source, DataConfig(source="k2", path="x", global_batch_size=4,
                                        micro_batch_size=4, moved_row_ranges=[[14, 3]]))
    assert rollback_window(cut, 3, "chunk") == [12, 7]
    # Synthetic rows: a chunk is data.synthetic_chunk_rows consecutive rows.
    synthetic = StepLoader(SyntheticSource(128, 8, 0, chunk_rows=90),
                           DataConfig(global_batch_size=8, micro_batch_size=8,
                                      synthetic_chunk_rows=90))
    assert rollback_window(synthetic, 25, "chunk") == [200, 70]  # chunk [180, 270)


POISON_STEP, CHUNK_ROWS = 25, 90  # rows 200..207 spike; their chunk is rows [180, 270)


def test_rollback_by_chunk_and_data_batch_follow_the_run(tmp_path, batches_read, capsys):
    config = small_config(
        tmp_path, "train.steps=28", "train.checkpoint_every=10", "train.keep_checkpoints=5",
        "train.spikes.action=rollback", "train.spikes.rollback_unit=chunk",
        "train.spikes.min_history=5", "train.spikes.threshold=1.5",
        f"data.synthetic_poison_rows=[[{POISON_STEP * 8}, 8]]",
        f"data.synthetic_chunk_rows={CHUNK_ROWS}")
    Trainer(config).run()
    [event] = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert event["moved_rows"] == [200, 70] and event["resumed_from_step"] == 20
    assert json.loads((tmp_path / "data_order.json").read_text()) == {
        "moved_row_ranges": [[200, 70]]}
    # After the rollback step 25 read the first rows after the chunk: original 270..277.
    np.testing.assert_array_equal(batches_read[POISON_STEP][-1],
                                  synthetic_rows(config, 270, 8))

    for step in (POISON_STEP, 27, 3):
        out = tmp_path / f"step{step}.npy"
        assert main(["data", "batch", "--run-dir", str(tmp_path), "--step", str(step),
                     "--out", str(out)]) == 0
        np.testing.assert_array_equal(np.load(out), batches_read[step][-1])
    capsys.readouterr()
    assert main(["data", "locate", "--run-dir", str(tmp_path), "--step", str(POISON_STEP)]) == 0
    located = json.loads(capsys.readouterr().out)
    assert located["pieces"] == [{  # synthetic chunks: CHUNK_ROWS rows each, no file
        "order_position": 3, "chunk_id": 3, "file": None, "first_line_0based": 0,
        "end_line_0based_exclusive": 8, "first_original_row": 270, "num_rows": 8,
        "first_batch_row": 0}]
    assert located["moved_row_ranges"] == [[200, 70]]
    # The run's config fixes the order: flags that would change it are refused, one line.
    assert main(["data", "batch", "--run-dir", str(tmp_path), "--step", "1",
                 "--global-batch", "4", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--global-batch: set by the run's config" in capsys.readouterr().err
