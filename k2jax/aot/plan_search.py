"""`k2jax aot --search`: compile the sensible plans for a config and topology and rank them by
the step-time model's predicted step (k2jax/aot/step_time.py).

A plan is (tensor-parallel size, micro-batch count, remat policy, attention kernel); FSDP takes
the rest of the slice (`mesh.fsdp=-1`), as in every k2jax plan. Plans are tried in order of
distance from the given config (it first, then every plan differing in one setting, then two,
...), so a short budget still explores around what the user has. Each plan is one full AOT
compile (minutes for a 65B model on a small machine); a compile started inside the budget is
finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Optional

from k2jax.aot.topology import Slice
from k2jax.config import (REMAT_POLICIES, Config, ConfigError, load_config,
                          resolve_device_batch)
from k2jax.model.attention_core import TPU_DEFAULT_ATTENTION

TENSOR_SIZES = (1, 2, 4, 8)
MICRO_BATCH_COUNTS = (1, 2, 4, 8, 16)
ATTENTION_KERNELS = ("splash", "pallas")


@dataclasses.dataclass(frozen=True)
class Plan:
    tensor: int
    micro_batches: int
    remat: str
    attention: str

    def overrides(self, global_batch: int) -> list[str]:
        return [f"mesh.tensor={self.tensor}", "mesh.fsdp=-1",
                f"data.micro_batch_size={global_batch // self.micro_batches}",
                f"model.remat={self.remat}", f"model.attention={self.attention}"] + (
                    [] if self.remat == "custom"  # another policy drops custom's tensor lists
                    else ["model.remat_save=[]", "model.remat_offload=[]"])


def plan_of(config: Config) -> Plan:
    attention = config.model.attention
    return Plan(config.mesh.tensor, config.data.accumulation_steps, config.model.remat,
                TPU_DEFAULT_ATTENTION if attention == "auto" else attention)


def candidate_plans(config: Config, chips: int) -> list[Plan]:
    """Every sensible plan, nearest to `config`'s own first."""
    start = plan_of(config)
    heads = config.model.num_kv_heads
    batch = config.data.global_batch_size
    tensors = [t for t in TENSOR_SIZES if heads % t == 0 and chips % t == 0]
    micros = [m for m in MICRO_BATCH_COUNTS if batch % m == 0]
    # no-remat never fits a large model; custom is the config's own choice of tensors
    remats = [r for r in REMAT_POLICIES if r not in ("none", "custom")]
    grid = [Plan(*p) for p in itertools.product(tensors, micros, remats, ATTENTION_KERNELS)]
    if start not in grid:
        grid.append(start)

    def distance(plan: Plan) -> tuple:
        differs = sum(a != b for a, b in zip(dataclasses.astuple(plan), dataclasses.astuple(start)))
        return (differs, abs(plan.micro_batches - start.micro_batches), plan.tensor)

    return sorted(grid, key=distance)


def search(config_path: str, overrides: list[str], tpu_slice: Slice, slices: int,
           budget_seconds: float, compile_one: Callable[[Config], dict],
           log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Compile plans until `budget_seconds` is spent; return their reports (each with "plan"
    and "plan_overrides"), ranked: plans that fit, fastest predicted step first, then the rest."""
    devices = tpu_slice.chips * slices  # one JAX device per chip on every generation here

    def load(more: list[str]) -> Config:
        return resolve_device_batch(load_config(config_path, more, per_device_batch=True),
                                    devices)

    config = load(overrides)
    start = time.perf_counter()
    reports = []
    for plan in candidate_plans(config, devices):
        if time.perf_counter() - start >= budget_seconds:
            break
        extra = plan.overrides(config.data.global_batch_size)
        try:
            variant = load(overrides + extra)
        except ConfigError:
            continue  # e.g. a tensor size the mesh cannot take
        if log:
            log(f"plan {len(reports) + 1}: {' '.join(extra)}")
        report = compile_one(variant)
        report["plan"] = dataclasses.asdict(plan)
        report["plan_overrides"] = extra
        reports.append(report)
    return rank(reports)


def rank(reports: list[dict]) -> list[dict]:
    def key(r: dict) -> tuple:
        step = r.get("predicted_step_seconds")
        return (not r.get("fits"), step is None, step or 0.0)

    return sorted(reports, key=key)


def format_ranking(reports: list[dict]) -> str:
    gib = 1024 ** 3
    lines = ["rank | tensor | micro-batches | remat | attention | GiB/chip (of HBM) | fits | "
             "predicted step s | predicted MFU | compute / memory / exposed comm s"]
    for i, r in enumerate(reports, 1):
        p = r["plan"]
        step = r.get("predicted_step_seconds")
        timing = (f"{step:.3f} | {r['predicted_mfu']:.1%} | {r['compute_seconds']:.3f} / "
                  f"{r['memory_seconds']:.3f} / {r['exposed_collective_seconds']:.3f}"
                  if step is not None else "- | - | -")
        lines.append(f"{i} | {p['tensor']} | {p['micro_batches']} | {p['remat']} | "
                     f"{p['attention']} | {r['bytes_per_chip'] / gib:.1f} of "
                     f"{r['hbm_bytes_per_chip'] / gib:.0f} | {'yes' if r['fits'] else 'no'} | "
                     f"{timing}")
    if reports:
        lines.append("best: " + " ".join(reports[0]["plan_overrides"]))
    return "\n".join(lines)
