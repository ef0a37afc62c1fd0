"""The padding plan: how a step's rows fill the devices.

K2's global batch (2^3 * 3 * 5 * 17 rows) has odd factors: no power-of-two pod splits it
evenly. The device batch is therefore `accumulation` micro-batches of `micro_rows` rows, each a
multiple of the data-parallel size (and of the process count, so every host feeds an equal
slice): the step's B real rows in order, then padding rows (token 0, loss mask 0, loss weight
0). Padding adds nothing to sum(loss * mask) nor to sum(mask), so the loss and gradients are
exactly those of the unpadded batch; throughput and MFU count only the real rows.
"""

from __future__ import annotations

import dataclasses
import math

from jax.sharding import Mesh

from k2jax.errors import UserError
from k2jax.sharding.rules import rules_list

ROWS_PER_DEVICE_DEFAULT = 4  # K2's own micro-batch per data-parallel rank (eval's default)


@dataclasses.dataclass(frozen=True)
class PaddingPlan:
    rows: int  # real rows of the step (data.global_batch_size)
    micro_rows: int  # rows per micro-step over the whole mesh, padding included
    accumulation: int  # micro-steps per step

    @property
    def padded_rows(self) -> int:
        """Rows of the device batch."""
        return self.micro_rows * self.accumulation

    @property
    def padding_rows(self) -> int:
        return self.padded_rows - self.rows


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    """How many ways the `batch` rule splits rows (product of its mesh axes)."""
    axes = dict(rules_list(rules)).get("batch")
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def unpadded(rows: int) -> PaddingPlan:
    """One micro-step of exactly `rows` rows (the data commands: no devices involved)."""
    return PaddingPlan(rows, rows, 1)


def training_plan(global_batch: int, micro_batch: int, data_parallel: int,
                  process_count: int = 1) -> PaddingPlan:
    """The train step's plan: global_batch / micro_batch micro-steps (data.micro_batch_size
    divides data.global_batch_size, config-checked), each padded to a multiple of the
    data-parallel size and of the process count."""
    micro = round_up(micro_batch, math.lcm(data_parallel, process_count))
    return PaddingPlan(global_batch, micro, global_batch // micro_batch)


def eval_plan(global_batch: int, micro_batch: int | None, data_parallel: int,
              process_count: int = 1) -> PaddingPlan:
    """eval-loss's plan: micro-steps of `micro_batch` rows over the mesh (None: 4 per
    data-parallel device, at most the batch rounded up to the data-parallel size), as many as
    cover the batch; the last ones padded."""
    if global_batch <= 0:
        raise UserError(f"data.global_batch_size must be positive, got {global_batch}")
    if micro_batch is None:
        per_device = min(ROWS_PER_DEVICE_DEFAULT, math.ceil(global_batch / data_parallel))
        micro_batch = round_up(per_device * data_parallel, process_count)
    if micro_batch <= 0 or micro_batch % math.lcm(data_parallel, process_count):
        raise UserError(f"micro_batch {micro_batch}: must be a positive multiple of the "
                        f"{data_parallel} data-parallel devices"
                        + (f" and of the {process_count} processes" if process_count > 1
                           else ""))
    return PaddingPlan(global_batch, micro_batch, math.ceil(global_batch / micro_batch))
