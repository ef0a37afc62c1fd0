"""k2jax/train/schedule.py: K2's warm-up + cosine learning rate, step by step, with K2's figures
(configs/k2-65b.yaml: peak 1.5e-4, min 1.5e-5, warm-up 2000, cosine to step 338760)."""

from __future__ import annotations

import numpy as np
import pytest

from k2jax.config import OptimizerConfig, load_config
from k2jax.train.schedule import k2_learning_rate

K2 = load_config("k2-65b").optimizer


def lr(config: OptimizerConfig, step: int) -> float:
    return float(k2_learning_rate(config)(step))


def test_k2s_figures_are_the_ones_scheduled():
    assert (K2.peak_lr, K2.min_lr, K2.warmup_steps, K2.decay_steps) == (1.5e-4, 1.5e-5, 2000,
                                                                          338760)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (1, 1.5e-4 / 2000), (1000, 0.75e-4), (1999, 1.5e-4 * 1999 / 2000),
    (2000, 1.5e-4),  # the peak, where warm-up ends and the cosine starts
    (2000 + 336760 // 2, (1.5e-4 + 1.5e-5) / 2),  # half way down the cosine
    (94100, 1.266e-4),  # ckpt_100's first update (K2's W&B log; docs/k2.md)
    (338760, 1.5e-5), (338761, 1.5e-5), (10**6, 1.5e-5),  # the end value, held
])
def test_k2_learning_rate_at_known_steps(step, expected):
    assert lr(K2, step) == pytest.approx(expected, rel=3e-4, abs=1e-12)


def test_warm_up_rises_linearly_then_the_cosine_never_rises():
    warm = np.array([lr(K2, s) for s in range(0, 2001, 250)])
    np.testing.assert_allclose(np.diff(warm), 1.5e-4 / 8, rtol=1e-5)
    decay = np.array([lr(K2, s) for s in range(2000, 338761, 8419)])
    assert np.all(np.diff(decay) < 0)


def test_without_warm_up_step_0_runs_at_the_peak():
    config = OptimizerConfig(peak_lr=1e-3, min_lr=1e-4, warmup_steps=0, decay_steps=100)
    assert lr(config, 0) == pytest.approx(1e-3)
    assert lr(config, 50) == pytest.approx(5.5e-4)
    assert lr(config, 100) == pytest.approx(1e-4)
