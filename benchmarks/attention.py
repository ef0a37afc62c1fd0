"""Attention benchmark: k2jax's Pallas flash attention vs XLA einsum-softmax vs jax's splash.

On a TPU: forward and forward+backward wall time and achieved TFLOP/s at K2's per-chip shape
(batch 1, seq 2048, 8 heads = one tensor-parallel shard of 64, head_dim 128, bf16).
Elsewhere: checks the three implementations agree at a small shape (Pallas in interpret mode)
and says that timing needs a TPU. With --aot TOPOLOGY (e.g. v5p:2x2x1, needs libtpu) it
compiles all three for that TPU from this host and prints the compiler's memory figures.

    python benchmarks/attention.py                       # on a TPU VM
    python benchmarks/attention.py --block-q 1024 --block-kv 512
    JAX_PLATFORMS=cpu python benchmarks/attention.py     # correctness only
    JAX_PLATFORMS=cpu python benchmarks/attention.py --aot v5p:2x2x1

FLOP convention: useful matmul FLOPs only, forward 4*B*H*S^2*D, backward 8*B*H*S^2*D (dq, dk,
dv, dP; the recomputation of S is not counted), both halved for causal attention. TFLOP/s
figures are therefore comparable with MFU accounting that discounts causal attention.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from k2jax.kernels import default_block_sizes, flash_attention  # noqa: E402
from k2jax.kernels.block_sizes import tpu_generation  # noqa: E402


def xla_attention(q, k, v, *, causal=True, sm_scale):
    """Plain XLA attention: einsum scores [B, H, S, S] in fp32, softmax, einsum. GQA by
    repeating kv heads. q [B, S, H, D], k/v [B, S, KVH, D] -> [B, S, H, D] in q's dtype."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * sm_scale
    if causal:
        seq = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                      preferred_element_type=jnp.float32).astype(q.dtype)


def splash_attention(q, k, v, *, causal=True, sm_scale, block_q, block_kv, interpret=False):
    """jax's splash attention (multi-head kernel, vmapped over batch). It takes [H, S, D] and
    applies no scale, so q is pre-scaled; GQA by repeating kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (splash_attention_kernel as
                                                                  splash, splash_attention_mask
                                                                  as masks)
    _, seq, heads, _ = q.shape
    group = heads // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    head_mask = masks.CausalMask((seq, seq)) if causal else masks.FullMask((seq, seq))
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv,
                              block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                              block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
    to_hsd = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    out = jax.vmap(kernel)(to_hsd(q * jnp.asarray(sm_scale, q.dtype)), to_hsd(k), to_hsd(v))
    return to_hsd(out)


def implementations(args, interpret):
    blocks = dict(block_q=args.block_q, block_kv=args.block_kv)
    scale = args.head_dim ** -0.5
    return {
        "pallas (k2jax)": functools.partial(flash_attention, causal=args.causal, sm_scale=scale,
                                            interpret=interpret, **blocks),
        "xla einsum": functools.partial(xla_attention, causal=args.causal, sm_scale=scale),
        "splash (jax)": functools.partial(splash_attention, causal=args.causal, sm_scale=scale,
                                          interpret=interpret, **blocks),
    }


def forward_backward(fn):
    """jit of (output, dq, dk, dv) for the loss sum(out * cotangent)."""

    def run(q, k, v, cotangent):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(cotangent))

    return jax.jit(run)


def inputs(args, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    dtype = jnp.dtype(args.dtype)
    q_shape = (args.batch, args.seq, args.heads, args.head_dim)
    kv_shape = (args.batch, args.seq, args.kv_heads, args.head_dim)
    return tuple(jax.random.normal(key, shape, dtype)
                 for key, shape in zip(keys, (q_shape, kv_shape, kv_shape, q_shape)))


def flops(args):
    causal = 0.5 if args.causal else 1.0
    forward = 4 * args.batch * args.heads * args.seq ** 2 * args.head_dim * causal
    return forward, 3 * forward


def time_call(fn, call_args, iters):
    jax.block_until_ready(fn(*call_args))  # compile and warm up
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*call_args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def benchmark_tpu(args):
    q, k, v, cotangent = inputs(args)
    fwd_flops, total_flops = flops(args)
    print(f"device {jax.devices()[0].device_kind}; B={args.batch} S={args.seq} H={args.heads} "
          f"KVH={args.kv_heads} D={args.head_dim} {args.dtype} causal={args.causal} "
          f"block_q={args.block_q} block_kv={args.block_kv}; median of {args.iters}")
    print(f"{'implementation':<16} {'fwd ms':>8} {'fwd TF/s':>9} {'fwd+bwd ms':>11} "
          f"{'fwd+bwd TF/s':>13}")
    for name, fn in implementations(args, interpret=False).items():
        try:
            fwd = time_call(jax.jit(fn), (q, k, v), args.iters)
            both = time_call(forward_backward(fn), (q, k, v, cotangent), args.iters)
        except Exception as error:  # one failing baseline must not hide the others
            print(f"{name:<16} failed: {str(error).splitlines()[0][:100]}")
            continue
        print(f"{name:<16} {fwd * 1e3:8.3f} {fwd_flops / fwd / 1e12:9.1f} {both * 1e3:11.3f} "
              f"{total_flops / both / 1e12:13.1f}")


def check_small(args):
    """Correctness at a small shape off-TPU (Pallas kernels in interpret mode)."""
    # Blocks of 128: splash's minimum; seq 256 still gives a 2 x 2 grid of blocks.
    small = argparse.Namespace(**{**vars(args), "batch": 1, "seq": 256, "heads": 4,
                                  "kv_heads": 2, "head_dim": 64, "block_q": 128,
                                  "block_kv": 128, "dtype": "float32"})
    q, k, v, cotangent = inputs(small, seed=1)
    impls = implementations(small, interpret=True)
    reference = forward_backward(impls.pop("xla einsum"))(q, k, v, cotangent)
    print(f"correctness at B=1 S=256 H=4 KVH=2 D=64 fp32 causal={small.causal}, "
          "max|err|/max|xla| for out, dq, dk, dv:")
    for name, fn in impls.items():
        try:
            got = forward_backward(fn)(q, k, v, cotangent)
        except Exception as error:
            print(f"  {name:<16} unavailable here: {str(error).splitlines()[0][:100]}")
            continue
        errors = [float(jnp.abs(g - r).max() / jnp.abs(r).max()) for g, r in zip(got, reference)]
        print(f"  {name:<16} " + "  ".join(f"{e:.1e}" for e in errors))
    print(f"timing needs a TPU (default backend here: {jax.default_backend()}); run this "
          "script on a TPU VM for the table.")


def compile_for(args, topology):
    """Compiles the three implementations (forward+backward) for one chip of `topology`."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    sharding = NamedSharding(Mesh(devices[:1], ("device",)), PartitionSpec())
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
             for x in jax.eval_shape(lambda: inputs(args))]
    print(f"ahead-of-time compile for {topology}, fwd+bwd at B={args.batch} S={args.seq} "
          f"H={args.heads} D={args.head_dim} {args.dtype}:")
    for name, fn in implementations(args, interpret=False).items():
        start = time.perf_counter()
        try:
            compiled = forward_backward(fn).lower(*specs).compile()
        except Exception as error:
            print(f"  {name:<16} failed: {str(error).splitlines()[0][:120]}")
            continue
        memory = compiled.memory_analysis()
        print(f"  {name:<16} compiled in {time.perf_counter() - start:5.1f} s, temp "
              f"{memory.temp_size_in_bytes / 2**20:7.1f} MiB")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--block-q", type=int, default=None, help="default: per generation")
    parser.add_argument("--block-kv", type=int, default=None)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--aot", metavar="TOPOLOGY", help="compile for this TPU topology")
    args = parser.parse_args(argv)
    on_tpu = jax.default_backend() == "tpu"
    generation = (args.aot.split(":")[0] if args.aot else
                  tpu_generation(jax.devices()[0].device_kind) if on_tpu else "v5p")
    defaults = default_block_sizes(generation, args.seq)
    args.block_q = args.block_q or defaults.block_q
    args.block_kv = args.block_kv or defaults.block_kv
    if args.aot:
        compile_for(args, args.aot)
    elif on_tpu:
        benchmark_tpu(args)
    else:
        check_small(args)


if __name__ == "__main__":
    main()
