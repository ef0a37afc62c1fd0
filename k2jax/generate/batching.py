"""Static shapes for generation and scoring: lengths and row counts rounded up to a few buckets,
so a run compiles each jitted step a handful of times, not once per prompt length."""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from k2jax.sharding.rules import rules_list


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))


def fine_bucket(n: int, minimum: int) -> int:
    """The smallest size >= n among `minimum` and 4 sizes per octave (64, 80, 96, 112, 128,
    160, ...; multiples of 8): at most 25% padding instead of up to 100%, for 4x the shapes."""
    if n <= minimum:
        return minimum
    octave = 1 << (math.ceil(math.log2(n)) - 1)  # n in (octave, 2 * octave]
    step = max(8, octave // 4)  # whole 8-row tiles
    return math.ceil(n / step) * step


def batch_shards(mesh: Optional[Mesh], rules: Optional[dict]) -> int:
    """How many ways a [B, ...] batch is split: the product of the mesh axes `batch` maps to."""
    if mesh is None:
        return 1
    axes = dict(rules_list(rules)).get("batch")
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def padded_rows(rows: int, shards: int) -> int:
    """Rows rounded up to a power of two that the batch shards divide."""
    rows = bucket(rows, 1)
    return math.ceil(rows / shards) * shards


def pad_left(sequences: list[list[int]], length: int, rows: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [rows, length], valid bool [rows, length]) with each sequence at the right
    end of its row; rows past len(sequences) are all padding."""
    tokens = np.full((rows, length), pad_id, np.int32)
    valid = np.zeros((rows, length), bool)
    for i, seq in enumerate(sequences):
        if seq:
            tokens[i, length - len(seq):] = seq
            valid[i, length - len(seq):] = True
    return tokens, valid


def pad_right(sequences: list[list[int]], length: int, rows: int, pad_id: int) -> np.ndarray:
    """tokens int32 [rows, length], each sequence from the left of its row."""
    tokens = np.full((rows, length), pad_id, np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = seq
    return tokens


def mesh_context(mesh: Optional[Mesh], rules: Optional[dict]):
    """The tracing context that makes the model's logical sharding constraints real."""
    import contextlib

    import jax

    if mesh is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(rules_list(rules)))
    return stack


def replicate(x: Any, mesh: Optional[Mesh]) -> Any:
    """Inside a jitted function: `x` on every device, so every host of a pod can read it."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec()))


def put_rows(array: np.ndarray, mesh: Optional[Mesh], rules: Optional[dict]) -> Any:
    """A host [B, ...] array onto the devices, rows split over the batch axes."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh is None:
        return jax.numpy.asarray(array)
    axes = dict(rules_list(rules)).get("batch")
    sharding = NamedSharding(mesh, PartitionSpec(axes, *([None] * (array.ndim - 1))))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
