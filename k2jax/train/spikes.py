"""Loss-spike detection (docs/k2.md, "Loss spikes").

Three kinds of spike:
- `nonfinite`: a non-finite loss, gradient norm or update.
- `ratio`: a loss above `threshold` x the running median of the last `window` applied steps
  (after `min_history` of them): a sharp spike. The train step itself refuses such updates
  when the action is `skip` or `rollback`; this class supplies that ceiling.
- `trend`: a slow, sustained rise, the shape of K2's malignant spikes (they rose over 8-34
  checkpoints, never 3x the median in one step): the mean of the last `trend_window` losses
  above the mean of the `trend_baseline` losses before them by more than `trend_margin` (a
  fraction of the baseline), for `trend_patience` steps in a row. Its updates were applied;
  only a rollback to a checkpoint before the rise began undoes them (`onset`).
"""

from __future__ import annotations

import collections
import math
import statistics

import numpy as np

from k2jax.config import SpikeConfig


class SpikeDetector:
    def __init__(self, config: SpikeConfig):
        self.config = config
        longest = max(config.window, config.trend_window + config.trend_baseline)
        self.history: collections.deque[float] = collections.deque(maxlen=longest)
        self.rising = 0  # consecutive steps the trend test has held
        self.trough_age = 0  # at a trend: how many applied steps ago the smoothed loss was lowest

    def median(self) -> float | None:
        if len(self.history) < self.config.min_history:
            return None
        window = self.config.window
        return statistics.median(list(self.history)[-window:])

    def loss_ceiling(self) -> float:
        """The largest loss the step may apply (inf for action `log`)."""
        median = self.median()
        if self.config.action == "log" or median is None:
            return math.inf
        return self.config.threshold * median

    def trend_means(self) -> tuple[float, float] | None:
        """(mean of the recent window, mean of the baseline before it), once both are full."""
        recent, baseline = self.config.trend_window, self.config.trend_baseline
        if not recent or len(self.history) < recent + baseline:
            return None
        losses = np.fromiter(self.history, np.float64)[-(recent + baseline):]
        return float(losses[baseline:].mean()), float(losses[:baseline].mean())

    def check(self, loss: float, grad_norm: float, update_norm: float = 0.0) -> str | None:
        """The spike kind ('nonfinite', 'ratio' or 'trend') or None; losses that were applied
        (healthy ones and a trend's) enter the history. A non-finite update (the step refused
        it) is a 'nonfinite' spike as well."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(update_norm)):
            return "nonfinite"
        median = self.median()
        if median is not None and loss > self.config.threshold * median:
            return "ratio"
        self.history.append(loss)
        means = self.trend_means()
        above = means is not None and means[0] > means[1] * (1.0 + self.config.trend_margin)
        self.rising = self.rising + 1 if above else 0
        if self.rising >= self.config.trend_patience:
            self.rising = 0  # the next report needs trend_patience more steps
            self.trough_age = self._trough_age()
            return "trend"
        return None

    def _trough_age(self) -> int:
        """Steps since the end of the lowest-mean window of trend_window losses in the
        history: where the rise began (the first window above the baseline comes much later,
        once the rise exceeds the margin)."""
        losses = np.fromiter(self.history, np.float64)
        sums = np.cumsum(np.concatenate([[0.0], losses]))
        width = self.config.trend_window
        means = (sums[width:] - sums[:-width]) / width  # means[i]: window ending at i + width - 1
        latest_lowest = len(means) - 1 - int(np.argmin(means[::-1]))  # a flat stretch: its end
        return len(losses) - width - latest_lowest

    def onset(self, step: int, kind: str) -> int:
        """The first step of the trouble a spike at `step` reports: the step itself, or for a
        trend the step after the trough of the smoothed loss before the rise (the history
        holds applied steps only, so this is approximate by any sharp spikes skipped)."""
        if kind != "trend":
            return step
        return max(0, step - self.trough_age + 1)

    def state(self) -> list[float]:
        return list(self.history)

    def restore(self, history: list[float]) -> None:
        self.history.clear()
        self.history.extend(history)
        self.rising = 0
