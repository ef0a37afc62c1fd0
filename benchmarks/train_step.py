"""Train-step speed: k2jax against Hugging Face transformers (PyTorch) on this CPU.

Both train the same LLaMA architecture (fp32, same batch, sequence length and AdamW), in the
same process, their steps timed in turns (medians); MFU is against the best measured fp32
matmul rate. A second table times the step's projection matmuls alone in each framework: a
lower bound on what either step can take on this CPU.

    JAX_PLATFORMS=cpu python benchmarks/train_step.py [--steps 8] [--only 100m]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import numpy as np  # noqa: E402

from k2jax.config import load_config  # noqa: E402
from k2jax.train.flops import (measure_matmul_peak, model_flops_per_step,  # noqa: E402
                               tokens_per_step)
from k2jax.train.setup import build_training_setup  # noqa: E402

SHAPES = {
    # name: (overrides, batch, seq)
    "tiny": (["model.hidden_size=64", "model.intermediate_size=176",
              "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4"], 16, 64),
    "100m": (["model.hidden_size=768", "model.intermediate_size=2048",
              "model.num_layers=12", "model.num_heads=12", "model.num_kv_heads=12"], 4, 512),
}


def k2jax_config(name, *extra):
    overrides, batch, seq = SHAPES[name]
    return load_config("configs/tiny.yaml", overrides + list(extra) + [
        f"data.seq_len={seq}", f"data.global_batch_size={batch}",
        f"data.micro_batch_size={batch}", "model.compute_dtype=float32", "model.remat=none",
        "model.attention=xla", "optimizer.warmup_steps=1", "optimizer.decay_steps=1000"])


def k2jax_stepper(config):
    """One k2jax train step (compiled and warmed up), run to completion per call."""
    setup = build_training_setup(config)
    state = setup.init_state()
    step = setup.lower().compile()
    rng = np.random.default_rng(0)
    shape = (setup.padding.padded_rows, config.data.seq_len)  # one device: no padding rows
    batch = jax.device_put(
        {"tokens": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
         "loss_mask": np.ones(shape, np.float32)}, setup.batch_sharding)
    ceiling = np.float32(np.inf)

    def one_step():
        nonlocal state
        state, metrics = step(state, batch, ceiling)
        jax.block_until_ready(metrics)

    for _ in range(2):  # warm-up
        one_step()
    return one_step


def torch_stepper(config):
    """One transformers train step (warmed up) per call."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=False, attn_implementation="sdpa"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=0.1)
    shape = (config.data.global_batch_size, config.data.seq_len)
    tokens = torch.randint(0, m.vocab_size, shape)

    def one_step():
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        one_step()
    return one_step


def interleaved_medians(steppers, steps):
    """Median seconds per step of each stepper, timed in turns (A, B, C, A, B, C, ...) so that
    the load of this shared machine, which drifts by up to 2x, falls on all of them alike."""
    times = [[] for _ in steppers]
    for _ in range(steps):
        for stepper, record in zip(steppers, times):
            start = time.perf_counter()
            stepper()
            record.append(time.perf_counter() - start)
    return [float(np.median(record)) for record in times]


def torch_matmul_peak(size=1024, seconds=1.0):
    import torch

    a = torch.randn(size, size)
    a @ a
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        runs += 1
    return runs * 2 * size ** 3 / (time.perf_counter() - start)


def projection_gemms(config):
    """Every dense-projection matmul of one train step as (kind, m, k, n, count): forward
    X @ W and its gradients dX = dY @ W^T and dW = X^T @ dY. Attention's own products are left
    out, so the time of these alone is a lower bound on the step's."""
    m = config.model
    t = config.data.global_batch_size * config.data.seq_len
    d = m.resolved_head_dim
    shapes = [(m.hidden_size, m.num_heads * d, m.num_layers),  # q
              (m.hidden_size, m.num_kv_heads * d, m.num_layers * 2),  # k, v
              (m.num_heads * d, m.hidden_size, m.num_layers),  # o
              (m.hidden_size, m.intermediate_size, m.num_layers * 2),  # gate, up
              (m.intermediate_size, m.hidden_size, m.num_layers),  # down
              (m.hidden_size, m.vocab_size, 1)]  # lm_head
    gemms = []
    for fan_in, fan_out, count in shapes:
        gemms += [("fwd", t, fan_in, fan_out, count), ("dx", t, fan_out, fan_in, count),
                  ("dw", fan_in, t, fan_out, count)]
    return gemms


def projection_floor(config, framework, repeats=5):
    """Seconds one train step spends in its projection matmuls if each ran at the speed it has
    alone (warm caches) in `framework` ("jax" or "torch"); the matmuls' GFLOP/s."""
    import torch

    rng = np.random.default_rng(0)
    total = flops = 0.0
    for kind, m, k, n, count in projection_gemms(config):
        # Operands in the layout a training step has them: dx multiplies by W^T, dw by X^T.
        a = rng.standard_normal((k, m) if kind == "dw" else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if kind == "dx" else (k, n)).astype(np.float32)
        if framework == "jax":
            ops = {"fwd": lambda a, b: a @ b, "dx": lambda a, b: a @ b.T,
                   "dw": lambda a, b: a.T @ b}
            fn, args = jax.jit(ops[kind]), (jax.numpy.asarray(a), jax.numpy.asarray(b))
            run = lambda: fn(*args).block_until_ready()  # noqa: E731
        else:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            ops = {"fwd": lambda: ta @ tb, "dx": lambda: ta @ tb.T, "dw": lambda: ta.T @ tb}
            run = ops[kind]
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total += (time.perf_counter() - start) / repeats * count
        flops += 2.0 * m * k * n * count
    return total, flops / total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", choices=sorted(SHAPES))
    args = parser.parse_args()
    import torch

    jax_peak, torch_peak = measure_matmul_peak(size=2048), torch_matmul_peak(size=2048)
    peak = max(jax_peak, torch_peak)  # one CPU peak for both MFUs: the best measured matmul
    print(f"fp32 2048^2 matmul: jax {jax_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} "
          f"GFLOP/s; MFU below is against {peak / 1e9:.1f} ({os.cpu_count()} cores, torch "
          f"threads {torch.get_num_threads()})")
    print("| config | framework | step s | tokens/s | MFU | step rate vs transformers |")
    print("|---|---|---|---|---|---|")
    floors, torch_steps = {}, {}
    for name in [args.only] if args.only else SHAPES:
        config = k2jax_config(name)
        tokens = tokens_per_step(config)
        flops = model_flops_per_step(config)
        labels = ["k2jax (scanned layers, default)", "k2jax (unrolled layers)", "transformers"]
        steppers = [k2jax_stepper(config),
                    k2jax_stepper(k2jax_config(name, "model.scan_layers=false")),
                    torch_stepper(config)]
        seconds = interleaved_medians(steppers, args.steps)
        del steppers
        torch_s = torch_steps[name] = seconds[-1]
        for label, step_s in zip(labels, seconds):
            print(f"| {name} | {label} | {step_s:.3f} | {tokens / step_s:,.0f} | "
                  f"{flops / step_s / peak:.1%} | {torch_s / step_s:.2f}x |", flush=True)
        floors[name] = {fw: projection_floor(config, fw) for fw in ("jax", "torch")}
    print("\nProjection matmuls alone (each timed by itself, warm caches; attention excluded): "
          "a lower bound on each framework's step")
    print("| config | framework | seconds | GFLOP/s | step rate vs transformers at this bound |")
    print("|---|---|---|---|---|")
    for name, by_framework in floors.items():
        for framework, (seconds, rate) in by_framework.items():
            print(f"| {name} | {framework} | {seconds:.3f} | {rate / 1e9:.0f} | "
                  f"{torch_steps[name] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
