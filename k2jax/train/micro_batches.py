"""One step's rows, one micro-batch at a time: the accumulation loop shared by the train step
and eval-loss (Levanter's `grad_accum.microbatched`).

A device batch [P, ...] of `accumulation` micro-batches is split so that micro-step a takes
rows {m * A + a}: each device's contiguous rows hold its share of every micro-batch, so the
split needs no cross-device traffic. A `lax.scan` runs the micro-steps one after the other, so
only one micro-batch of activations and logits is ever live.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.sharding.rules import batch_sharding


def over_micro_batches(fn: Callable[..., Any], batch: tuple[jax.Array, ...], accumulation: int,
                       mesh: Mesh, rules: dict, stack: bool = False) -> Any:
    """fn(*micro_batch) for each of the `accumulation` micro-batches of `batch` (arrays [P, ...]
    sharded over the batch axes, P a multiple of `accumulation`), to be traced inside a jit.

    stack=False: the sum of fn's outputs over the micro-batches (a pytree like fn's output,
    accumulated in fn's output dtypes: return fp32 for fp32 accumulation).
    stack=True: fn's outputs stacked, leaves [accumulation, ...] (to sum elsewhere).
    """
    if accumulation == 1:  # no zero-filled accumulator to write and add to
        out = fn(*batch)
        return jax.tree.map(lambda x: x[None], out) if stack else out
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_sharding(mesh, rules).spec))

    def split(x):
        micro = x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(micro, micro_sharding)

    micro_batches = tuple(split(x) for x in batch)
    if stack:
        return jax.lax.scan(lambda carry, xs: (carry, fn(*xs)), None, micro_batches)[1]
    shapes = jax.eval_shape(fn, *(x[0] for x in micro_batches))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    add = lambda total, xs: (jax.tree.map(jnp.add, total, fn(*xs)), None)  # noqa: E731
    return jax.lax.scan(add, zeros, micro_batches)[0]
