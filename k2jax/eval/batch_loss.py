"""K2's masked loss of fixed weights on one global batch, sharded and micro-batched.

The global batch [B, S] is padded with fully masked rows up to a multiple of the micro-batch
(K2's global batch is not a multiple of most pod sizes; a masked row adds 0 to both sums), sharded
over the data-parallel axes, and a jitted `lax.scan` runs one micro-batch at a time, so only
one micro-batch of activations and logits is ever live. The scan returns each micro-step's
(loss sum, mask count) in fp32; they are added on the host in float64, so the step's loss is
sum / count over the whole global batch, for any micro-batch split. With K2's per-group
normalisation (train/loss_weights.py, as the train step) the mask is weighted per row on the
host first and the weighted sum is divided by the number of groups.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.sharding.rules import batch_sharding, rules_list
from k2jax.train.loss_weights import counted_tokens_per_row, loss_row_weights

ROWS_PER_DEVICE_DEFAULT = 4  # K2's own micro-batch per data-parallel rank


@dataclasses.dataclass(frozen=True)
class MicroBatchPlan:
    global_batch: int  # rows of the step
    micro_batch: int  # rows per micro-step over the whole mesh
    padded_rows: int  # global_batch rounded up to a multiple of micro_batch

    @property
    def accumulation(self) -> int:
        return self.padded_rows // self.micro_batch


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    axes = batch_sharding(mesh, rules).spec[0]
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def plan_micro_batches(global_batch: int, micro_batch: int | None, dp_size: int
                       ) -> MicroBatchPlan:
    """micro_batch None: 4 rows per data-parallel device (at most the batch, rounded up to dp)."""
    if global_batch <= 0:
        raise UserError(f"--global-batch must be positive, got {global_batch}")
    if micro_batch is None:
        per_device = min(ROWS_PER_DEVICE_DEFAULT, math.ceil(global_batch / dp_size))
        micro_batch = per_device * dp_size
    if micro_batch <= 0 or micro_batch % dp_size:
        raise UserError(f"--micro-batch {micro_batch}: must be a positive multiple of the "
                        f"{dp_size} data-parallel devices")
    padded = math.ceil(global_batch / micro_batch) * micro_batch
    return MicroBatchPlan(global_batch, micro_batch, padded)


def make_batch_loss_fn(config: ModelConfig, mesh: Mesh, rules: dict, plan: MicroBatchPlan,
                       params_shardings: Any):
    """fn(params, tokens int32 [P, S], loss_mask f32 [P, S]) -> (loss sums f32 [A],
    mask counts f32 [A]) for P = plan.padded_rows, A = plan.accumulation micro-steps."""
    model = K2Model(config)
    rows_sharding = batch_sharding(mesh, rules)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *rows_sharding.spec))
    accumulation, micro = plan.accumulation, plan.micro_batch

    def fn(params, tokens, loss_mask):
        seq = tokens.shape[1]

        # Micro-step a takes rows {m * A + a}: every device's contiguous rows hold its share of
        # every micro-batch, so splitting needs no cross-device traffic (as in the train step).
        def split(x):
            x = x.reshape(micro, accumulation, seq).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        def body(_, micro_batch):
            logits = model.apply({"params": params}, micro_batch[0])
            return None, masked_next_token_loss(logits, micro_batch[0], micro_batch[1])

        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                nn.logical_axis_rules(rules_list(rules)):
            _, (sums, counts) = jax.lax.scan(body, None, (split(tokens), split(loss_mask)))
        return sums, counts

    # Replicated sums, so every host (of a multi-host pod) can read them.
    return jax.jit(fn, in_shardings=(params_shardings, rows_sharding, rows_sharding),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


class BatchLossEvaluator:
    """Loss of fixed, already sharded `params` on global batches of `plan.global_batch` rows."""

    def __init__(self, params: Any, config: ModelConfig, mesh: Mesh, rules: dict,
                 plan: MicroBatchPlan, loss_normalization: str = "global",
                 loss_group_rows: int = 4):
        if loss_normalization == "per_group" and (loss_group_rows <= 0 or
                                                  plan.global_batch % loss_group_rows):
            raise UserError(f"--loss-group-rows {loss_group_rows}: must be positive and divide "
                            f"the global batch of {plan.global_batch} rows")
        self.params = params
        self.plan = plan
        self.normalization = (loss_normalization, loss_group_rows)
        self.rows_sharding = batch_sharding(mesh, rules)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        self.fn = make_batch_loss_fn(config, mesh, rules, plan, shardings)

    def _put(self, array: np.ndarray) -> jax.Array:
        padded = np.zeros((self.plan.padded_rows,) + array.shape[1:], array.dtype)
        padded[:len(array)] = array  # padding rows: token 0 with loss mask 0
        return jax.make_array_from_callback(padded.shape, self.rows_sharding,
                                            lambda index: padded[index])

    def __call__(self, tokens: np.ndarray, loss_mask: np.ndarray) -> dict:
        """tokens int32 [B, S], loss_mask float32 [B, S] (the whole global batch, on every host)
        -> {"loss", "loss_sum", "tokens"} with tokens = number of counted predictions and
        loss_sum the (per-group weighted, under per_group) sum of token losses."""
        if tokens.shape[0] != self.plan.global_batch:
            raise UserError(f"batch has {tokens.shape[0]} rows, expected "
                            f"{self.plan.global_batch}")
        loss_mask = loss_mask.astype(np.float32)
        weights, divisor = loss_row_weights(loss_mask, len(loss_mask), *self.normalization)
        count = float(np.asarray(counted_tokens_per_row(loss_mask), np.float64).sum())
        if self.normalization[0] == "global":  # weights are 1; divide by the exact count
            divisor = count
        sums, _ = self.fn(self.params, self._put(tokens.astype(np.int32)),
                          self._put(loss_mask * np.asarray(weights)[:, None]))
        loss_sum = float(np.sum(np.asarray(jax.device_get(sums), np.float64)))
        return {"loss": loss_sum / float(divisor) if count else float("nan"),
                "loss_sum": loss_sum, "tokens": int(round(count))}
