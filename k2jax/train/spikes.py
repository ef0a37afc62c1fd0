"""Loss-spike detection (docs/k2.md).

A spike is a non-finite loss or gradient norm, or a loss above `threshold` x the running
median of the last `window` applied steps (after `min_history` of them). The train step itself
refuses non-finite or over-ceiling updates when the action is `skip` or `rollback`; this class
supplies that ceiling and classifies each step's outcome.
"""

from __future__ import annotations

import collections
import math
import statistics

from k2jax.config import SpikeConfig


class SpikeDetector:
    def __init__(self, config: SpikeConfig):
        self.config = config
        self.history: collections.deque[float] = collections.deque(maxlen=config.window)

    def median(self) -> float | None:
        if len(self.history) < self.config.min_history:
            return None
        return statistics.median(self.history)

    def loss_ceiling(self) -> float:
        """The largest loss the step may apply (inf for action `log`)."""
        median = self.median()
        if self.config.action == "log" or median is None:
            return math.inf
        return self.config.threshold * median

    def check(self, loss: float, grad_norm: float, update_norm: float = 0.0) -> str | None:
        """The spike kind ('nonfinite' or 'ratio') or None; healthy losses enter the history.
        A non-finite update (the step refused it) is a 'nonfinite' spike as well."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(update_norm)):
            return "nonfinite"
        median = self.median()
        if median is not None and loss > self.config.threshold * median:
            return "ratio"
        self.history.append(loss)
        return None

    def state(self) -> list[float]:
        return list(self.history)

    def restore(self, history: list[float]) -> None:
        self.history.clear()
        self.history.extend(history)
