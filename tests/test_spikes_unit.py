"""k2jax/train/spikes.py: which steps are spikes, the loss ceiling the step may apply, and the
history a checkpoint carries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from k2jax.config import ConfigError, SpikeConfig, load_config
from k2jax.train.spikes import SpikeDetector


def detector(**settings) -> SpikeDetector:
    return SpikeDetector(SpikeConfig(**{"action": "skip", "window": 4, "threshold": 2.0,
                                        "min_history": 3, **settings}))


def test_no_ratio_spike_and_no_ceiling_before_min_history():
    spikes = detector()
    assert [spikes.check(loss, 1.0) for loss in (2.0, 100.0, 1.0)] == [None, None, None]
    assert spikes.median() == 2.0 and spikes.loss_ceiling() == 4.0  # 3 losses: now it applies
    fresh = detector()
    fresh.check(2.0, 1.0)
    assert fresh.median() is None and fresh.loss_ceiling() == math.inf


def test_a_loss_above_threshold_times_the_median_is_a_spike_and_stays_out_of_the_history():
    spikes = detector()
    for loss in (3.0, 2.0, 2.5):
        assert spikes.check(loss, 1.0) is None
    assert spikes.loss_ceiling() == 5.0  # threshold 2 x median 2.5
    assert spikes.check(5.01, 1.0) == "ratio"
    assert spikes.check(5.0, 1.0) is None  # at the ceiling: applied (strictly above spikes)
    assert spikes.state() == [3.0, 2.0, 2.5, 5.0]


@pytest.mark.parametrize("loss, grad_norm, update_norm", [
    (math.nan, 1.0, 0.0), (math.inf, 1.0, 0.0), (2.0, math.nan, 0.0), (2.0, math.inf, 0.0),
    (2.0, 1.0, math.nan),  # the step refused a non-finite update
])
def test_non_finite_values_are_spikes_even_without_history(loss, grad_norm, update_norm):
    spikes = detector()
    assert spikes.check(loss, grad_norm, update_norm) == "nonfinite"
    assert spikes.state() == []


def test_the_median_covers_the_last_window_steps_only():
    spikes = detector(window=3, min_history=1)
    for loss in (9.0, 8.0, 1.0, 2.0, 3.0):  # 9 and 8 have left the window
        assert spikes.check(loss, 1.0) is None
    assert spikes.state() == [1.0, 2.0, 3.0] and spikes.median() == 2.0


def test_log_only_never_limits_the_update_but_still_classifies():
    spikes = detector(action="log", min_history=1)
    spikes.check(1.0, 1.0)
    assert spikes.loss_ceiling() == math.inf
    assert spikes.check(10.0, 1.0) == "ratio"


def test_history_survives_a_checkpoint_round_trip():
    spikes = detector()
    for loss in (3.0, 2.0, 2.5, 2.2, 2.1):
        spikes.check(loss, 1.0)
    restored = detector()
    restored.restore(spikes.state())
    assert restored.state() == [2.0, 2.5, 2.2, 2.1]  # window 4
    assert restored.loss_ceiling() == spikes.loss_ceiling() == pytest.approx(2.0 * 2.15)
    restored.restore([1.0] * 10)  # an older run's longer window: the last 4 are kept
    assert restored.state() == [1.0] * 4


@pytest.mark.parametrize("override, key", [("train.spikes.window=0", "train.spikes.window"),
                                           ("train.spikes.threshold=1.0",
                                            "train.spikes.threshold")])
def test_bad_settings_name_their_own_key(override, key):
    with pytest.raises(ConfigError, match=f"^config key '{key}': must be"):
        load_config(None, [override])


# -- slow rises, as K2's malignant spikes were (issue 26.4) -----------------------------------

CHECKPOINT = 20  # steps between checkpoints, scaled down from K2's 941


def k2_shaped_curve(rise_start_ckpt=60, rise_ckpts=34, rise=0.25, seed=0):
    """Per-step losses: a slow decrease with noise for `rise_start_ckpt` checkpoints, then a
    rise of `rise` nats spread evenly over `rise_ckpts` checkpoints (K2's first malignant spike
    lasted about 34 checkpoints): never a step far above the running median."""
    rng = np.random.default_rng(seed)
    steps = np.arange((rise_start_ckpt + rise_ckpts) * CHECKPOINT)
    healthy = 2.2 - 0.2 * steps / len(steps)
    ramp = np.clip((steps - rise_start_ckpt * CHECKPOINT) / (rise_ckpts * CHECKPOINT), 0, 1)
    return healthy + rise * ramp + rng.normal(0.0, 0.02, len(steps))


def trend_detector(**settings) -> SpikeDetector:
    return SpikeDetector(SpikeConfig(**{
        "action": "rollback", "window": 100, "threshold": 3.0, "min_history": 10,
        "trend_window": CHECKPOINT, "trend_baseline": 20 * CHECKPOINT, "trend_margin": 0.01,
        "trend_patience": CHECKPOINT, **settings}))


def first_spike(spikes: SpikeDetector, losses) -> tuple[int, str] | None:
    for step, loss in enumerate(losses):
        kind = spikes.check(float(loss), 1.0)
        if kind:
            return step, kind
    return None


def test_a_k2_shaped_slow_rise_is_a_trend_the_median_ratio_never_sees():
    losses = k2_shaped_curve()
    rise_start = 60 * CHECKPOINT
    # The 3x-median test alone (trend off) lets the whole rise through.
    assert first_spike(trend_detector(trend_window=0), losses) is None
    spikes = trend_detector()
    step, kind = first_spike(spikes, losses)
    assert kind == "trend"
    # Caught within ten checkpoints of the rise's start (K2's team saw it after tens), and
    # the onset it reports is the rise's start give or take a checkpoint, so the rollback
    # restores the checkpoint before the rise, as K2's team did.
    assert rise_start < step < rise_start + 10 * CHECKPOINT
    onset = spikes.onset(step, kind)
    assert abs(onset - rise_start) <= CHECKPOINT


def test_a_healthy_noisy_decrease_raises_nothing():
    losses = k2_shaped_curve(rise_start_ckpt=200, rise_ckpts=1, rise=0.0, seed=1)
    assert first_spike(trend_detector(), losses) is None


def test_a_sharp_spike_is_a_ratio_spike_and_does_not_start_a_trend():
    losses = list(k2_shaped_curve(rise_start_ckpt=30, rise_ckpts=1, rise=0.0, seed=2))
    losses[500] = 4 * losses[499]  # one step far above the median
    spikes = trend_detector()
    assert first_spike(spikes, losses[:501]) == (500, "ratio")
    assert spikes.onset(500, "ratio") == 500
    assert first_spike(spikes, losses[501:]) is None  # the spike never entered the history


def test_a_trend_is_reported_once_per_patience_and_restore_resets_it():
    spikes = trend_detector(trend_window=2, trend_baseline=3, trend_patience=2, window=5,
                            threshold=100.0)
    kinds = [spikes.check(loss, 1.0) for loss in (1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2)]
    assert kinds == [None] * 6 + ["trend"]
    assert spikes.onset(6, "trend") == 5  # the loss stood flat until step 4, then rose
    assert [spikes.check(1.2, 1.0), spikes.check(1.2, 1.0)] == [None, "trend"]
    spikes.restore([1.0] * 5)
    assert spikes.rising == 0 and spikes.check(1.0, 1.0) is None


@pytest.mark.parametrize("override, key", [
    ("train.spikes.trend_window=-1", "train.spikes.trend_window"),
    ("train.spikes.trend_window=5", "train.spikes.trend_baseline"),
    ("train.spikes.trend_patience=0", "train.spikes.trend_patience"),
    ("train.spikes.trend_margin=0", "train.spikes.trend_margin"),
])
def test_bad_trend_settings_name_their_own_key(override, key):
    with pytest.raises(ConfigError, match=f"^config key '{key}': must be"):
        load_config(None, [override])


def test_the_k2_presets_watch_for_slow_rises_and_roll_back_whole_files():
    spikes = load_config("k2-65b").train.spikes
    assert spikes.trend_window == 941 and spikes.rollback_unit == "file"
