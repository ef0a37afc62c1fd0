"""Global batches whose row count the data-parallel devices do not divide.

K2's global batch (2^3 * 3 * 5 * 17 rows) has odd factors: no power-of-two pod splits it
evenly. Each micro-batch is padded with rows whose loss mask is 0 up to a multiple of the
data-parallel size. Padding rows add nothing to sum(loss * mask) nor to sum(mask), so the loss and gradients
(sum / count over the global batch) are exactly those of the unpadded batch; throughput and
MFU count only the real rows.
"""

from __future__ import annotations

import math

import numpy as np
from jax.sharding import Mesh

from k2jax.config import Config
from k2jax.sharding.rules import rules_list


def data_parallel_size(mesh: Mesh, rules: dict) -> int:
    """How many ways the `batch` rule splits rows (product of its mesh axes)."""
    axes = dict(rules_list(rules)).get("batch")
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def padded_global_rows(config: Config, mesh: Mesh, process_count: int = 1) -> int:
    """Rows of the device batch: accumulation_steps padded micro-batches.

    The result is also a multiple of `process_count` (each host feeds an equal slice)."""
    data_parallel = data_parallel_size(mesh, config.mesh.rules)
    step = math.lcm(data_parallel, process_count)
    micro = -(-config.data.micro_batch_size // step) * step
    return micro * config.data.accumulation_steps


def pad_rows(host_batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Append zero rows (tokens 0, loss mask 0) to every array of a host batch up to `rows`."""
    out = {}
    for name, array in host_batch.items():
        missing = rows - array.shape[0]
        if missing < 0:
            raise ValueError(f"{name}: {array.shape[0]} rows exceed the padded size {rows}")
        pad = np.zeros((missing,) + array.shape[1:], array.dtype)
        out[name] = np.concatenate([array, pad]) if missing else array
    return out
