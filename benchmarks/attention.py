"""Attention benchmark: k2jax's Pallas flash attention vs jax's splash attention (vs XLA).

On a TPU: forward and forward+backward wall time and achieved TFLOP/s of each implementation
at K2's per-chip shapes (batch 1, 8 heads = one tensor-parallel shard of 64, head_dim 128,
bf16, causal) for the sequence lengths of K2 and K2-Chat (their presets' data.seq_len), then which kernel `model.attention: auto`
should pick on this chip: k2jax's own kernel only if it is at least as fast as splash at every
shape (forward+backward, what training runs). Elsewhere it says that timing needs a TPU, skips
the table and checks the implementations agree at a small shape (Pallas in interpret mode).
With --aot TOPOLOGY (e.g. v5p:2x2x1, needs libtpu) it compiles them for that TPU from this
host and prints the compiler's memory figures.

    python benchmarks/attention.py                       # on a TPU VM
    python benchmarks/attention.py --seqs 2048 --block-q 1024 --block-kv 512
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

from k2jax.config import load_config  # noqa: E402
from k2jax.kernels import default_block_sizes, flash_attention, splash_attention  # noqa: E402
from k2jax.kernels.block_sizes import tpu_generation  # noqa: E402
from k2jax.model.attention_core import TPU_DEFAULT_ATTENTION  # noqa: E402

# Row names of the two kernels, as `model.attention` values.
KERNELS = {"pallas (k2jax)": "pallas", "splash (jax)": "splash"}


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


def at_seq(args, seq, generation):
    """args for one sequence length, with the generation's default blocks where not given."""
    defaults = default_block_sizes(generation, seq)
    return argparse.Namespace(**{**vars(args), "seq": seq,
                                 "block_q": args.block_q or defaults.block_q,
                                 "block_kv": args.block_kv or defaults.block_kv})


def pick_auto(fwd_bwd_seconds):
    """{seq: {model.attention value: fwd+bwd seconds}} -> the kernel `auto` should run: k2jax's
    own ("pallas") only if it is at least as fast as splash at every shape; None when a kernel
    failed (or was not timed) at some shape."""
    times = list(fwd_bwd_seconds.values())
    if not times or any(set(KERNELS.values()) - set(t) for t in times):
        return None
    return "pallas" if all(t["pallas"] <= t["splash"] for t in times) else "splash"


def benchmark_tpu(args, generation):
    print(f"device {jax.devices()[0].device_kind}; B={args.batch} H={args.heads} "
          f"KVH={args.kv_heads} D={args.head_dim} {args.dtype} causal={args.causal}; "
          f"median of {args.iters}")
    print(f"{'implementation':<16} {'seq':>5} {'blocks':>9} {'fwd ms':>8} {'fwd TF/s':>9} "
          f"{'fwd+bwd ms':>11} {'fwd+bwd TF/s':>13}")
    fwd_bwd_seconds = {}
    for seq in args.seqs:
        shape = at_seq(args, seq, generation)
        q, k, v, cotangent = inputs(shape)
        fwd_flops, total_flops = flops(shape)
        blocks = f"{shape.block_q}x{shape.block_kv}"
        for name, fn in implementations(shape, interpret=False).items():
            try:
                fwd = time_call(jax.jit(fn), (q, k, v), args.iters)
                both = time_call(forward_backward(fn), (q, k, v, cotangent), args.iters)
            except Exception as error:  # one failing baseline must not hide the others
                print(f"{name:<16} {seq:>5} failed: {str(error).splitlines()[0][:100]}")
                continue
            if name in KERNELS:
                fwd_bwd_seconds.setdefault(seq, {})[KERNELS[name]] = both
            print(f"{name:<16} {seq:>5} {blocks:>9} {fwd * 1e3:8.3f} "
                  f"{fwd_flops / fwd / 1e12:9.1f} {both * 1e3:11.3f} "
                  f"{total_flops / both / 1e12:13.1f}")
    choice = pick_auto(fwd_bwd_seconds)
    if choice is None:
        print("auto: no verdict (a kernel failed at some shape)")
    else:
        agrees = ("as it does now" if choice == TPU_DEFAULT_ATTENTION else
                  f"change TPU_DEFAULT_ATTENTION in k2jax/model/attention_core.py from "
                  f"{TPU_DEFAULT_ATTENTION!r}")
        print(f"auto should pick on {generation}: {choice} ({agrees})")


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
    print(f"timing needs a TPU (default backend here: {jax.default_backend()}): timing rows "
          "and the auto verdict skipped; run this script on a TPU VM for them.")


def compile_for(args, topology):
    """Compiles the implementations (forward+backward) for one chip of `topology`."""
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    sharding = NamedSharding(Mesh(devices[:1], ("device",)), PartitionSpec())
    for seq in args.seqs:
        shape = at_seq(args, seq, topology.split(":")[0])
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                 for x in jax.eval_shape(lambda: inputs(shape))]
        print(f"ahead-of-time compile for {topology}, fwd+bwd at B={args.batch} S={seq} "
              f"H={args.heads} KVH={args.kv_heads} D={args.head_dim} {args.dtype} blocks "
              f"{shape.block_q}x{shape.block_kv}:")
        for name, fn in implementations(shape, interpret=False).items():
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
    parser.add_argument("--seqs", type=lambda text: [int(x) for x in text.split(",")],
                        default=[load_config(name).data.seq_len for name in ("k2-65b", "k2-chat")],
                        help="comma-separated; default K2's and K2-Chat's data.seq_len")
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
    if args.aot:
        compile_for(args, args.aot)
    elif on_tpu:
        benchmark_tpu(args, tpu_generation(jax.devices()[0].device_kind))
    else:
        check_small(args)

if __name__ == "__main__":
    main()
