"""Run an attention kernel once per device under `shard_map`.

A `pallas_call` is opaque to XLA's SPMD partitioner: left to itself it would gather q, k and v
onto every device. Both kernels (k2jax's flash attention and jax's splash attention) are
therefore called per shard, with batch split over the data-parallel mesh axes and heads over
the tensor axis. The sequence is never split: every query needs every earlier key.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax


def per_device_attention(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, *, mesh,
                         batch_axes=None, head_axes=None,
                         segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """`kernel(q, k, v, segment_ids=...)` on each device's shard of global arrays.

    q [B, S, N, D], k/v [B, S, K, D] (global shapes), segment_ids int [B, S] or None; `head_axes`
    must divide K as well as N. Returns [B, S, N, D] sharded like q."""
    qkv_spec = jax.sharding.PartitionSpec(batch_axes, None, head_axes, None)
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v), mesh=mesh,
                             in_specs=(qkv_spec,) * 3, out_specs=qkv_spec,
                             check_vma=False)(q, k, v)
    segment_spec = jax.sharding.PartitionSpec(batch_axes, None)
    return jax.shard_map(lambda q, k, v, s: kernel(q, k, v, segment_ids=s), mesh=mesh,
                         in_specs=(qkv_spec,) * 3 + (segment_spec,), out_specs=qkv_spec,
                         check_vma=False)(q, k, v, segment_ids)
