"""Train-step speed: k2jax against Hugging Face transformers (PyTorch) on this CPU.

Both train the same LLaMA architecture (fp32, same batch, sequence length and AdamW), in the
same process run; MFU is against the measured fp32 matmul peak of each framework.

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
from k2jax.sharding.mesh import build_mesh  # noqa: E402
from k2jax.train.flops import flops_per_token, measure_matmul_peak  # noqa: E402
from k2jax.train.optimizer import make_optimizer  # noqa: E402
from k2jax.train.state import create_train_state, state_shardings  # noqa: E402
from k2jax.train.step import make_train_step  # noqa: E402

SHAPES = {
    # name: (overrides, batch, seq)
    "tiny": (["model.vocab_size=32032", "model.hidden_size=64", "model.intermediate_size=176",
              "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=4"], 16, 64),
    "100m": (["model.vocab_size=32032", "model.hidden_size=768", "model.intermediate_size=2048",
              "model.num_layers=12", "model.num_heads=12", "model.num_kv_heads=12"], 4, 512),
}


def k2jax_config(name, *extra):
    overrides, batch, seq = SHAPES[name]
    return load_config("configs/tiny.yaml", overrides + list(extra) + [
        f"data.seq_len={seq}", f"data.global_batch_size={batch}",
        f"data.micro_batch_size={batch}", "model.compute_dtype=float32", "model.remat=none",
        "model.attention=xla", "optimizer.warmup_steps=1", "optimizer.decay_steps=1000"])


def time_k2jax(config, steps):
    mesh = build_mesh(config.mesh)
    optimizer = make_optimizer(config.optimizer, config.model.scan_layers)
    _, shardings = state_shardings(config, optimizer, mesh)
    state = create_train_state(config, optimizer, mesh, shardings)
    step = make_train_step(config, optimizer, mesh, shardings)
    rng = np.random.default_rng(0)
    shape = (config.data.global_batch_size, config.data.seq_len)
    batch = {"tokens": rng.integers(0, config.model.vocab_size, shape).astype(np.int32),
             "loss_mask": np.ones(shape, np.float32)}
    ceiling = np.float32(np.inf)
    for _ in range(2):  # compile + warm-up
        state, metrics = step(state, batch, ceiling)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, ceiling)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def time_torch(config, steps):
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
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    return (time.perf_counter() - start) / steps


def torch_matmul_peak(size=1024, seconds=1.0):
    import torch

    a = torch.randn(size, size)
    a @ a
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        runs += 1
    return runs * 2 * size ** 3 / (time.perf_counter() - start)


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
    for name in [args.only] if args.only else SHAPES:
        config = k2jax_config(name)
        tokens = config.data.global_batch_size * config.data.seq_len
        flops = flops_per_token(config.model, config.data.seq_len) * tokens
        torch_s = time_torch(config, args.steps)
        variants = [("k2jax (scanned layers, default)", config),
                    ("k2jax (unrolled layers)", k2jax_config(name, "model.scan_layers=false"))]
        for label, variant in variants:
            jax_s = time_k2jax(variant, args.steps)
            print(f"| {name} | {label} | {jax_s:.3f} | {tokens / jax_s:,.0f} | "
                  f"{flops / jax_s / peak:.1%} | {torch_s / jax_s:.2f}x |")
        print(f"| {name} | transformers | {torch_s:.3f} | {tokens / torch_s:,.0f} | "
              f"{flops / torch_s / peak:.1%} | 1.00x |")


if __name__ == "__main__":
    main()
