"""Shared settings for training tests: a model small enough to compile in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from k2jax.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

SMALL_MODEL = [
    "model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64",
    "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
    "data.seq_len=16", "data.global_batch_size=8", "data.micro_batch_size=4",
    "optimizer.peak_lr=1e-2", "optimizer.min_lr=1e-3", "optimizer.warmup_steps=2",
    "optimizer.decay_steps=200", "train.log_every=1", "train.peak_flops_per_device=1e11",
]


def small_config(run_dir, *extra):
    return load_config(TINY, SMALL_MODEL + [f"train.run_dir={run_dir}", *extra])


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses_by_step(run_dir) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def restore_state_numpy(run_dir, step: int) -> dict:
    """A training checkpoint's state (step, params, opt_state) as host arrays, on this process's
    one device whatever mesh and number of processes wrote it."""
    import jax

    path = Path(run_dir) / "checkpoints" / str(step) / "state"
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                             sharding=one_device),
                              checkpointer.metadata(path).item_metadata)
        state = checkpointer.restore(path, target)
    return jax.tree.map(np.asarray, state)


def restore_params_numpy(run_dir, step: int) -> dict:
    return restore_state_numpy(run_dir, step)["params"]


def assert_trees_equal(a, b) -> None:
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train_command(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "k2jax.cli", "train", "--config", str(TINY), *SMALL_MODEL,
            f"train.run_dir={run_dir}", *extra]


def subprocess_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return env


def run_train(run_dir, *extra, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(run_dir, *extra), env=subprocess_env(), timeout=timeout,
                          capture_output=True, text=True)


def record_batches_read(monkeypatch) -> dict[int, list[np.ndarray]]:
    """step -> the real rows' tokens int32 [B, S] of each read of that step, in read order
    (every read of a step's rows goes through StepLoader.host_batch)."""
    from k2jax.data.loader import StepLoader

    seen: dict[int, list[np.ndarray]] = {}
    original = StepLoader.host_batch

    def recording(self, step):
        batch = original(self, step)
        seen.setdefault(step, []).append(batch["tokens"][:self.data.global_batch_size].copy())
        return batch

    monkeypatch.setattr(StepLoader, "host_batch", recording)
    return seen
