"""The CPU floor under k2jax's generation and scoring: the same chain of fp32 matmuls as one
decode step / one scoring forward of benchmarks/generate.py's 134 M model, in plain jax
(XLA:CPU's dot kernels) and in plain torch (oneDNN/MKL), with nothing else around them.

If XLA's chain is slower than torch's, no change to k2jax's generation code can bring it to
transformers' speed on a CPU: what is left is the kernel library. CPU time of one thread
(`time.process_time`, each framework told to use one thread) is reported because it is what a
loaded machine distorts least; the two-thread wall time is reported beside it.

    JAX_PLATFORMS=cpu python benchmarks/cpu_matmul_floor.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

# The 134 M model of benchmarks/generate.py (SHAPE_100M with K2's vocabulary).
HIDDEN, MLP, LAYERS = 768, 2048, 12
CASES = {"decode step, 2 rows": 2, "scoring forward, 4 x 132 tokens": 4 * 132}


def _vocab() -> int:
    from generate import K2_CONFIG  # benchmarks/generate.py, beside this script

    from k2jax.config import load_config

    return load_config(K2_CONFIG).model.vocab_size


def _weights(rng, torch_layout: bool):
    """One layer's matrices as k2jax holds them ([in, out]) or as torch does ([out, in])."""
    import numpy as np

    shapes = {"qkv": (HIDDEN, 3 * HIDDEN), "o": (HIDDEN, HIDDEN), "gate": (HIDDEN, MLP),
              "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}
    layers = [{k: (rng.standard_normal(s) * 0.02).astype(np.float32) for k, s in shapes.items()}
              for _ in range(LAYERS)]
    head = (rng.standard_normal((HIDDEN, _vocab())) * 0.02).astype(np.float32)
    if torch_layout:
        layers = [{k: v.T.copy() for k, v in layer.items()} for layer in layers]
        head = head.T.copy()
    return layers, head


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu) * 1e3, statistics.median(wall) * 1e3


def run_jax(rows: int, repeats: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    layers, head = jax.tree.map(jnp.asarray, _weights(np.random.default_rng(0), False))

    @jax.jit
    def chain(x, layers, head):
        for p in layers:
            a = x @ p["qkv"]
            x = x + a[:, :HIDDEN] @ p["o"]
            x = x + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
        return x @ head

    x = jnp.ones((rows, HIDDEN), jnp.float32)
    return _time(lambda: chain(x, layers, head).block_until_ready(), repeats)


def run_torch(rows: int, repeats: int) -> tuple[float, float]:
    import numpy as np
    import torch

    layers, head = _weights(np.random.default_rng(0), True)
    layers = [{k: torch.from_numpy(v) for k, v in p.items()} for p in layers]
    head = torch.from_numpy(head)
    linear, silu = torch.nn.functional.linear, torch.nn.functional.silu

    def chain(x):
        with torch.no_grad():
            for p in layers:
                a = linear(x, p["qkv"])
                x = x + linear(a[:, :HIDDEN], p["o"])
                x = x + linear(silu(linear(x, p["gate"])) * linear(x, p["up"]), p["down"])
            return linear(x, head)

    x = torch.ones(rows, HIDDEN)
    return _time(lambda: chain(x), repeats)


def _child(framework: str, rows: int, threads: int, repeats: int) -> tuple[float, float]:
    """One measurement in a fresh process, so each thread setting is the process's own."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if threads == 1:  # XLA:CPU runs a dot on its Eigen pool unless told not to
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import torch; torch.set_num_threads({threads}); "
            f"import cpu_matmul_floor as m; print(*m.run_{framework}({rows}, {repeats}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average {load} at the start; medians of {args.repeats}; ms per chain")
    print(f"{'':34s}{'jax 1 thr CPU':>14s}{'torch 1 thr CPU':>16s}{'ratio':>7s}"
          f"{'jax 2 thr wall':>15s}{'torch 2 thr wall':>17s}{'ratio':>7s}")
    for name, rows in CASES.items():
        j1, _ = _child("jax", rows, 1, args.repeats)
        t1, _ = _child("torch", rows, 1, args.repeats)
        _, j2 = _child("jax", rows, 2, args.repeats)
        _, t2 = _child("torch", rows, 2, args.repeats)
        print(f"{name:34s}{j1:14.1f}{t1:16.1f}{t1 / j1:7.2f}{j2:15.1f}{t2:17.1f}{t2 / j2:7.2f}",
              flush=True)
    print(f"ratio: torch time / jax time (above 1: jax is faster); load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
