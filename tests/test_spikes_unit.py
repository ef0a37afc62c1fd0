"""k2jax/train/spikes.py: which steps are spikes, the loss ceiling the step may apply, and the
history a checkpoint carries."""

from __future__ import annotations

import math

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
