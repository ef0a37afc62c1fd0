"""Ahead-of-time TPU compiles shared by the kernel and aot tests (libtpu, no TPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.kernels import default_block_sizes
from train_utils import REPO, TINY, subprocess_env


def compile_over_data_and_tensor(sharded_attention, name: str) -> str:
    """fwd+bwd of `sharded_attention` on a v5p 2x2x1 slice as a (data 2, tensor 2) mesh: batch 2
    and 16 heads, so each chip runs K2's per-chip shape. Returns the compiled HLO text."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    mesh = Mesh(np.asarray(devices).reshape(2, 2), ("data", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor", None))
    q = jax.ShapeDtypeStruct((2, 2048, 16, 128), jnp.bfloat16, sharding=sharding)
    blocks = default_block_sizes("v5p", 2048)

    def loss(q, k, v):
        out = sharded_attention(q, k, v, mesh=mesh, batch_axes="data", head_axes="tensor",
                                interpret=False, block_q=blocks.block_q,
                                block_kv=blocks.block_kv)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    print(f"{name} v5p data2 x tensor2 fwd+bwd compiled in {time.perf_counter() - start:.1f} s")
    return compiled.as_text()


def aot_small_sharded_step(attention: str) -> dict:
    """`k2jax aot --json` of a 2-layer bf16 model (head_dim 128) on v5e-4 as fsdp 2 x tensor 2,
    with `model.attention=attention`: the report."""
    model = ["model.vocab_size=512", "model.hidden_size=256", "model.intermediate_size=512",
             "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
             "model.compute_dtype=bfloat16", f"model.attention={attention}", "data.seq_len=256",
             "data.global_batch_size=8", "data.micro_batch_size=4", "mesh.fsdp=2",
             "mesh.tensor=2"]
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5e-4", "--json", "--no-flops", *model]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
