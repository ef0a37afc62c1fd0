"""Ahead-of-time TPU compiles of `model.attention: splash` (jax's splash attention), on a CPU
host, with libtpu: at K2's per-chip shapes for v5p, v5e and v6e, GQA with segment ids, per
device under shard_map, and inside the sharded train step where `auto` now picks it. Mosaic
lowers the kernels inside these compiles, so a kernel that compiles here compiles on the chip.

    JAX_PLATFORMS=cpu python -m pytest tests/test_splash_attention_tpu_compile.py --durations=0
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: TPU ahead-of-time compiles "
                                     "need it (pip install libtpu)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from k2jax.kernels import (default_block_sizes, sharded_splash_attention,  # noqa: E402
                           splash_attention)
from test_flash_attention_tpu_compile import K2_SHARD, compile_attention  # noqa: E402
from train_utils import REPO, TINY, subprocess_env  # noqa: E402

pytestmark = pytest.mark.slow  # each compile 13-70 s on 2 busy cores

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@pytest.mark.parametrize("seq", [2048, 8192], ids=["k2_2048", "k2chat_8192"])
@pytest.mark.parametrize("generation", list(TOPOLOGIES))
def test_k2_shard_compiles_fwd_and_bwd(generation, seq):
    compiled, seconds = compile_attention(TOPOLOGIES[generation], grad=True,
                                          kernel=splash_attention, **{**K2_SHARD, "seq": seq})
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"splash {generation} seq {seq} fwd+bwd compiled in {seconds:.1f} s, "
          f"temp {temp / 2**20:.1f} MiB")
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernels, not an XLA fallback
    # No [seq, seq] score matrix in HBM: one per head in fp32 alone would be 16 MiB at 2048.
    assert temp < seq * seq * 4 * K2_SHARD["heads"] // 4


@pytest.mark.parametrize("topology, overrides", [
    ("v5p:2x2x1", dict(kv_heads=2, segments=True)),      # GQA + packed documents
    ("v5e:2x2", dict(kv_heads=1, seq=1000)),             # MQA, ragged (padded) sequence
], ids=["gqa_segments", "mqa_ragged"])
def test_variants_compile_fwd_and_bwd(topology, overrides):
    shape = {**K2_SHARD, **{k: v for k, v in overrides.items() if k in K2_SHARD}}
    extra = {k: v for k, v in overrides.items() if k not in K2_SHARD}
    compiled, seconds = compile_attention(topology, grad=True, kernel=splash_attention,
                                          **shape, **extra)
    print(f"splash {topology} {overrides} fwd+bwd compiled in {seconds:.1f} s")
    assert "tpu_custom_call" in compiled.as_text()


def test_sharded_over_data_and_tensor_axes_compiles():
    """A v5p 2x2x1 slice as a (data 2, tensor 2) mesh, K2's per-chip shape on every chip:
    shard_map keeps the kernel per device (no all-gather of q, k, v)."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = Mesh(np.asarray(devices).reshape(2, 2), ("data", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
    q = jax.ShapeDtypeStruct((2, 2048, 16, 128), jnp.bfloat16, sharding=sharding)
    blocks = default_block_sizes("v5p", 2048)

    def loss(q, k, v):
        out = sharded_splash_attention(q, k, v, mesh=mesh, batch_axes="data",
                                       head_axes="tensor", interpret=False,
                                       block_q=blocks.block_q, block_kv=blocks.block_kv)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    print(f"splash v5p data2 x tensor2 fwd+bwd compiled in {time.perf_counter() - start:.1f} s")
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    assert "all-gather" not in text


def test_auto_compiles_splash_inside_the_sharded_train_step():
    """`k2jax aot` plans `model.attention: auto` as splash: Mosaic lowers it per device under
    shard_map in the full train step (fsdp 2 x tensor 2, head_dim 128, bf16)."""
    model = ["model.vocab_size=512", "model.hidden_size=256", "model.intermediate_size=512",
             "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
             "model.compute_dtype=bfloat16", "model.attention=auto", "data.seq_len=256",
             "data.global_batch_size=8", "data.micro_batch_size=4", "mesh.fsdp=2",
             "mesh.tensor=2"]
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5e-4", "--json", "--no-flops", *model]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attention"] == "splash" and report["fits"] is True
