"""Model FLOPs per token and per-device peaks, for MFU.

FLOPs per trained token = 6 * N + 6 * L * S * H * D, where N counts every weight used in a
matmul (all parameters but the embedding lookup and the norm scales), L layers, S sequence
length, H heads, D head dim. The attention term is 12 * L * S * H * D for full attention
(QK^T and PV, forward + backward); causal masking halves it. Rematerialisation is not counted
(MFU, not hardware utilisation).

`model_flops_per_step` is the one owner of a step's model FLOPs: the trainer's MFU, `k2jax
aot`'s and the benchmarks' all divide it (the real rows only, never the zero-mask padding).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.config import Config, ModelConfig

# bf16 dense peak per chip (FLOP/s).
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5 lite": 197e12, "v5p": 459e12, "v6e": 918e12,
              "v6 lite": 918e12, "h100": 989e12, "h200": 989e12, "a100": 312e12}


def matmul_params(config: ModelConfig) -> int:
    e, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    mlp_matrices = 3 if config.mlp_activation == "swiglu" else 2
    per_layer = e * d * (2 * n + 2 * k) + mlp_matrices * e * m
    return config.num_layers * per_layer + e * v  # + output projection


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 6 * config.num_layers * seq_len * config.num_heads * config.resolved_head_dim
    return 6 * matmul_params(config) + attention


def tokens_per_step(config: Config) -> int:
    """Real tokens of one optimizer step (global batch rows x sequence length)."""
    return config.data.global_batch_size * config.data.seq_len


def model_flops_per_step(config: Config) -> float:
    """Model FLOPs of one optimizer step over its real tokens: what MFU divides."""
    return flops_per_token(config.model, config.data.seq_len) * tokens_per_step(config)


def attention_flops_per_step(config: Config) -> float:
    """The causal attention term of `model_flops_per_step` (6 L S H D per token). Adding it once
    more gives the full-attention count MaxText used from 2024-05 to 2025-07 (docs/maxtext.md)."""
    m = config.model
    return (6 * m.num_layers * config.data.seq_len * m.num_heads * m.resolved_head_dim
            * tokens_per_step(config))


def peak_flops_for(device) -> float | None:
    kind = str(getattr(device, "device_kind", "")).lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None


def measure_matmul_peak(dtype=jnp.float32, size: int = 1024, seconds: float = 1.0) -> float:
    """Achieved FLOP/s of a square matmul on the default device (the CPU 'peak' for MFU)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        runs += 1
    return runs * 2 * size ** 3 / (time.perf_counter() - start)
