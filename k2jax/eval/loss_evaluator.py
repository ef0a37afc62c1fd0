"""eval-loss's side of the step loss: the train step's loss (train/step_loss.py, one
definition) of fixed, already sharded weights on device batches, jitted once.

The batch comes from the StepLoader padded by eval-loss's padding plan (sharding/padding.py:
masked rows up to whole micro-batches; a masked row adds 0 to both sums). Each micro-step's
weighted loss sum comes back in fp32 and they are added on the host in float64.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from k2jax.data.loader import batch_dtypes
from k2jax.sharding.rules import batch_sharding
from k2jax.train.step_loss import StepLoss


def jitted_sums(step_loss: StepLoss, params_shardings: Any, batch_keys):
    """StepLoss.sums jitted for params on `params_shardings` and a device batch with
    `batch_keys`, its outputs replicated so every host (of a pod) can read them."""
    rows = batch_sharding(step_loss.mesh, step_loss.rules)
    return jax.jit(step_loss.sums, in_shardings=(params_shardings, {k: rows for k in batch_keys}),
                   out_shardings=NamedSharding(step_loss.mesh, PartitionSpec()))


class LossEvaluator:
    """`step_loss` (its rows, normalisation, accumulation) of `params` on device batches of
    the entries `data` (a DataConfig) asks for."""

    def __init__(self, params: Any, step_loss: StepLoss, data):
        self.params = params
        shardings = jax.tree.map(lambda x: x.sharding, params)
        self.keys = tuple(batch_dtypes(data))
        self.fn = jitted_sums(step_loss, shardings, self.keys)

    def __call__(self, batch: dict[str, Any]) -> dict:
        """batch: StepLoader.device_batch's entries -> {"loss", "loss_sum", "tokens"}: tokens =
        counted predictions, loss_sum the (per-group weighted, under per_group) sum of token
        losses, loss = loss_sum / the normalisation's divisor."""
        sums, count, divisor = jax.device_get(self.fn(self.params,
                                                      {k: batch[k] for k in self.keys}))
        loss_sum = float(np.sum(np.asarray(sums, np.float64)))
        return {"loss": loss_sum / float(divisor) if count else float("nan"),
                "loss_sum": loss_sum, "tokens": int(round(float(count)))}
