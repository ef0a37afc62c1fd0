"""Rollback as K2's team did it (issue 26.4): restore the last checkpoint before the trouble and
move WHOLE files that had not started there (k2jax/data/rollback.py `rollback_files`), and the
trainer doing so on a slow rise (k2jax/train/spikes.py `trend`)."""

import json

import pytest

from k2jax.config import DataConfig
from k2jax.data.chunked_source import ChunkedRowSource
from k2jax.data.loader import StepLoader
from k2jax.data.order import RowMap
from k2jax.data.rollback import file_run, rollback_files
from k2jax.data.synthetic import SyntheticSource
from k2jax.train.trainer import Trainer
from train_utils import losses_by_step, small_config


def three_files(**data) -> StepLoader:
    # Files of 10, 12 and 11 rows at global rows [0, 10), [10, 22), [22, 33); 4 rows a step.
    source = ChunkedRowSource(RowMap([5, 7, 9], [10, 12, 11]), reader=None, seq_len=8)
    return StepLoader(source, DataConfig(source="k2", path="x", global_batch_size=4,
                                         micro_batch_size=4, **data))


def test_whole_files_not_started_at_the_checkpoint_are_moved():
    loader = three_files()
    # K2's first restart: the checkpoint (step 2, row 8) falls before the file the trouble
    # began in (file 7 from row 10; step 3 reads rows 12..15): that whole file moves.
    assert rollback_files(loader, resume_step=2, onset_step=3) == [10, 12]
    # An onset step reading across a boundary (rows 8..11): the file under way at the
    # checkpoint stays, the next (whole) one moves.
    assert rollback_files(loader, resume_step=2, onset_step=2) == [10, 12]
    # A checkpoint at a file's first row: that file had not started, so it moves whole.
    assert rollback_files(three_files(), resume_step=0, onset_step=1) == [0, 10]
    # Trouble inside the file under way at the checkpoint: no whole file holds it, so the rest
    # of that file from the checkpoint's row on.
    assert rollback_files(loader, resume_step=1, onset_step=1) == [4, 6]


def test_file_runs_follow_earlier_moves():
    cut = three_files(moved_row_ranges=[[14, 3]])  # file 7 now stands as rows 10..13, 17..21
    assert file_run(cut, 12) == (10, 19)  # original 10..13 and 17..21 are contiguous now
    assert file_run(cut, 31) == (30, 33)  # the moved piece at the end of the order
    synthetic = StepLoader(SyntheticSource(128, 8, 0, chunk_rows=90),
                           DataConfig(global_batch_size=8, micro_batch_size=8,
                                      synthetic_chunk_rows=90))
    assert file_run(synthetic, 200) == (180, 270)
    assert rollback_files(synthetic, resume_step=20, onset_step=25) == [180, 90]


@pytest.mark.slow  # a tiny training run of 40 steps
def test_a_slow_rise_rolls_back_to_the_checkpoint_before_it_and_moves_its_file(tmp_path):
    # Rows 200..231 (steps 25..28) are random tokens: their losses rise above the baseline but
    # never reach the 100x ratio ceiling, so only the trend test can see them.
    config = small_config(
        tmp_path, "train.steps=40", "train.checkpoint_every=10", "train.keep_checkpoints=5",
        "train.spikes.action=rollback", "train.spikes.rollback_unit=file",
        "train.spikes.threshold=100", "train.spikes.trend_window=2",
        "train.spikes.trend_baseline=6", "train.spikes.trend_margin=0.05",
        "train.spikes.trend_patience=2", "data.synthetic_poison_rows=[[200, 32]]",
        "data.synthetic_chunk_rows=90")
    Trainer(config).run()
    [event] = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert event["kind"] == "trend" and event["step"] in (26, 27)
    assert 24 <= event["onset_step"] <= 25
    # Restored checkpoint 20 (rows 160..167), the last before the rise; the whole synthetic
    # file [180, 270) had not started there and moved to the end.
    assert event["resumed_from_step"] == 20 and event["moved_rows"] == [180, 90]
    assert json.loads((tmp_path / "data_order.json").read_text()) == {
        "moved_row_ranges": [[180, 90]]}
    assert max(losses_by_step(tmp_path)) == 40


@pytest.mark.slow  # a tiny training run of 30 steps
def test_a_logged_trend_keeps_every_step_in_the_metrics(tmp_path):
    config = small_config(
        tmp_path, "train.steps=30", "train.checkpoint_every=10", "train.spikes.action=skip",
        "train.spikes.threshold=100", "train.spikes.trend_window=2",
        "train.spikes.trend_baseline=6", "train.spikes.trend_margin=0.05",
        "train.spikes.trend_patience=2", "data.synthetic_poison_rows=[[200, 32]]")
    Trainer(config).run()
    events = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert events and {e["kind"] for e in events} == {"trend"}
    assert {e["action"] for e in events} == {"log"}  # skip cannot undo applied updates
    assert sorted(losses_by_step(tmp_path)) == list(range(1, 31))  # no step left out
