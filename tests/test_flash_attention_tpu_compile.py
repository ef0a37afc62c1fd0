"""Ahead-of-time TPU compiles of the flash attention kernels, on a CPU host, with libtpu.

Lowers and compiles the forward and the backward (grad of a loss through the custom_vjp) for
TPU v4, v5e, v5p (and v6e) topologies at K2's per-device shape (batch 1, seq 2048, 8 heads = a
tensor-parallel shard of 64, head_dim 128, bf16), so Mosaic tiling/layout errors are caught
here rather than on a pod. Mosaic lowers Pallas kernels inside that same compile, so a kernel
that compiles here compiles on the chip. Run:
    JAX_PLATFORMS=cpu python -m pytest tests/test_flash_attention_tpu_compile.py --durations=0
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: TPU ahead-of-time compiles "
                                     "need it (pip install libtpu)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from k2jax.kernels import (default_block_sizes, flash_attention,  # noqa: E402
                           sharded_flash_attention)
from tpu_compile_utils import compile_over_data_and_tensor  # noqa: E402

pytestmark = pytest.mark.slow  # TPU AOT compiles with libtpu

TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
K2_SHARD = dict(batch=1, seq=2048, heads=8, kv_heads=8, head_dim=128)  # 64 heads / TP 8
COMPILE_SECONDS_LIMIT = 60  # generous: each compile takes 1-3 s on 2 cores


def compile_attention(topology, *, batch, seq, heads, kv_heads, head_dim, dtype=jnp.bfloat16,
                      segments=False, causal=True, grad=False, kernel=flash_attention):
    """Compiles `kernel` (flash attention, or splash; or grad of a loss through it) for one
    chip of `topology` with the generation's default block sizes; returns (compiled, seconds)."""
    generation = topology.split(":")[0]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = Mesh(devices[:1], ("device",))  # per-chip shapes: one device of the slice
    replicated = NamedSharding(mesh, PartitionSpec())
    blocks = default_block_sizes(generation, seq)

    def spec(shape, dtype_):
        return jax.ShapeDtypeStruct(shape, dtype_, sharding=replicated)

    q = spec((batch, seq, heads, head_dim), dtype)
    kv = spec((batch, seq, kv_heads, head_dim), dtype)
    segment_ids = spec((batch, seq), jnp.int32) if segments else None

    def attention(q, k, v, segment_ids):
        # interpret=False: the default would pick interpret mode on this CPU host.
        return kernel(q, k, v, causal=causal, segment_ids=segment_ids,
                      block_q=blocks.block_q, block_kv=blocks.block_kv, interpret=False)

    def loss(q, k, v, segment_ids):
        return jnp.sum(attention(q, k, v, segment_ids).astype(jnp.float32) ** 2)

    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else attention
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(q, kv, kv, segment_ids).compile()
    return compiled, time.perf_counter() - start


@pytest.mark.parametrize("generation", list(TOPOLOGIES))
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_k2_shard_compiles(generation, grad):
    compiled, seconds = compile_attention(TOPOLOGIES[generation], grad=grad, **K2_SHARD)
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"{generation} {'fwd+bwd' if grad else 'fwd'} compiled in {seconds:.1f} s, "
          f"temp {temp / 2**20:.1f} MiB")
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernels, not an XLA fallback
    assert seconds < COMPILE_SECONDS_LIMIT
    # No [seq, seq] score matrix in HBM: one per head in fp32 alone would be 128 MiB.
    seq, heads = K2_SHARD["seq"], K2_SHARD["heads"]
    assert temp < seq * seq * heads * 4 // 4


@pytest.mark.parametrize("topology, overrides", [
    ("v5p:2x2x1", dict(kv_heads=2, segments=True)),                  # GQA + packed documents
    ("v5e:2x2", dict(head_dim=64, seq=1024)),                        # [B, H, S, D] layout
    ("v4:2x2x1", dict(head_dim=256, seq=1024, causal=False)),
    ("v5p:2x2x1", dict(dtype=jnp.float32, seq=1000)),                # fp32, padded sequence
], ids=["gqa_segments", "head_dim_64", "head_dim_256_full", "fp32_padded"])
def test_variants_compile_fwd_and_bwd(topology, overrides):
    overrides = dict(overrides)  # parametrize shares the dict between runs
    shape = {**K2_SHARD, **{k: overrides.pop(k) for k in list(overrides) if k in K2_SHARD}}
    compiled, seconds = compile_attention(topology, grad=True, **shape, **overrides)
    print(f"{topology} {shape} {overrides} fwd+bwd compiled in {seconds:.1f} s")
    assert "tpu_custom_call" in compiled.as_text()


def test_sharded_over_data_and_tensor_axes_compiles():
    """A v5p 2x2x1 slice as a (data 2, tensor 2) mesh: global batch 2 and 16 heads, so each
    chip runs the kernel at K2's per-chip shape. shard_map keeps the kernel per device."""
    text = compile_over_data_and_tensor(sharded_flash_attention, "flash")
    assert "tpu_custom_call" in text
    assert "all-gather" not in text  # every chip attends over its own shard only