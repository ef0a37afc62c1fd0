"""K2's masked loss of fixed weights on one global batch, sharded and micro-batched.

The batch comes from the StepLoader (k2jax/data/loader.py) padded by eval-loss's padding plan
(k2jax/sharding/padding.py: masked rows up to whole micro-batches; a masked row adds 0 to both
sums) and sharded over the data-parallel axes. The micro-batches run one at a time through the
train step's accumulation helper (k2jax/train/micro_batches.py), so only one micro-batch of
activations and logits is ever live; each micro-step's weighted loss sum comes back in fp32
and they are added on the host in float64. The loss weights are the train step's
(train/loss_weights.py): sum / count over the global batch, or K2's per-group mean.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.sharding.padding import PaddingPlan
from k2jax.sharding.rules import batch_sharding, rules_list
from k2jax.train.loss_weights import counted_tokens_per_row, loss_row_weights
from k2jax.train.micro_batches import over_micro_batches


def make_batch_loss_fn(config: ModelConfig, mesh: Mesh, rules: dict, plan: PaddingPlan,
                       params_shardings: Any, loss_normalization: str = "global",
                       loss_group_rows: int = 4):
    """fn(params, tokens int32 [P, S], loss_mask f32 [P, S]) -> (weighted loss sums f32 [A],
    counted tokens f32 [], divisor f32 []) for P = plan.padded_rows, A = plan.accumulation
    micro-steps; the loss is sum(sums) / divisor."""
    model = K2Model(config)
    rows_sharding = batch_sharding(mesh, rules)

    def fn(params, tokens, loss_mask):
        def micro_loss(micro_tokens, micro_mask):
            logits = model.apply({"params": params}, micro_tokens)
            return masked_next_token_loss(logits, micro_tokens, micro_mask)[0]

        weights, divisor = loss_row_weights(loss_mask, plan.rows, loss_normalization,
                                            loss_group_rows)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                nn.logical_axis_rules(rules_list(rules)):
            sums = over_micro_batches(micro_loss, (tokens, loss_mask * weights[:, None]),
                                      plan.accumulation, mesh, rules, stack=True)
        return sums, jnp.sum(counted_tokens_per_row(loss_mask)), divisor

    # Replicated outputs, so every host (of a multi-host pod) can read them.
    return jax.jit(fn, in_shardings=(params_shardings, rows_sharding, rows_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


class BatchLossEvaluator:
    """Loss of fixed, already sharded `params` on device batches laid out by `plan`."""

    def __init__(self, params: Any, config: ModelConfig, mesh: Mesh, rules: dict,
                 plan: PaddingPlan, loss_normalization: str = "global",
                 loss_group_rows: int = 4):
        if loss_normalization == "per_group" and (loss_group_rows <= 0 or
                                                  plan.rows % loss_group_rows):
            raise UserError(f"train.loss_group_rows {loss_group_rows}: must be positive and divide "
                            f"the global batch of {plan.rows} rows")
        self.params = params
        self.plan = plan
        shardings = jax.tree.map(lambda x: x.sharding, params)
        self.fn = make_batch_loss_fn(config, mesh, rules, plan, shardings, loss_normalization,
                                     loss_group_rows)

    def __call__(self, batch: dict[str, Any]) -> dict:
        """batch: tokens int32 [P, S], loss_mask float32 [P, S] (StepLoader.device_batch)
        -> {"loss", "loss_sum", "tokens"} with tokens = number of counted predictions and
        loss_sum the (per-group weighted, under per_group) sum of token losses."""
        sums, count, divisor = jax.device_get(self.fn(self.params, batch["tokens"],
                                                      batch["loss_mask"]))
        loss_sum = float(np.sum(np.asarray(sums, np.float64)))
        return {"loss": loss_sum / float(divisor) if count else float("nan"),
                "loss_sum": loss_sum, "tokens": int(round(float(count)))}
