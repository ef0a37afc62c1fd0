"""`k2jax aot --search` (k2jax/aot/plan_search.py) and the step-time keys of `k2jax aot --json`
on a real compile."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from k2jax.aot.plan_search import Plan, candidate_plans, format_ranking, plan_of, rank
from k2jax.config import load_config
from train_utils import REPO, TINY, subprocess_env

SMALL = ["model.vocab_size=512", "model.hidden_size=256", "model.intermediate_size=512",
         "model.num_layers=3", "model.num_heads=2", "model.num_kv_heads=2",
         "model.compute_dtype=bfloat16", "data.seq_len=256", "data.global_batch_size=16",
         "data.micro_batch_size=8"]


def test_candidates_start_from_the_config_and_widen_one_setting_at_a_time():
    config = load_config(TINY, SMALL + ["model.remat=full", "model.attention=splash"])
    plans = candidate_plans(config, chips=4)
    assert plans[0] == plan_of(config) == Plan(1, 2, "full", "splash")
    differs = [sum(a != b for a, b in zip((p.tensor, p.micro_batches, p.remat, p.attention),
                                          (1, 2, "full", "splash"))) for p in plans]
    assert differs == sorted(differs) and differs[1] == 1
    assert {p.tensor for p in plans} == {1, 2}  # 2 kv heads: no tensor 4 or 8
    assert {p.micro_batches for p in plans} == {1, 2, 4, 8, 16}
    assert "none" not in {p.remat for p in plans}
    assert len(set(plans)) == len(plans)


def test_rank_puts_fitting_plans_first_fastest_first():
    def report(step, fits):
        return {"predicted_step_seconds": step, "fits": fits, "plan": {}, "bytes_per_chip": 1}

    ranked = rank([report(3.0, True), report(1.0, False), report(2.0, True), report(None, True)])
    assert [(r["predicted_step_seconds"], r["fits"]) for r in ranked] == [
        (2.0, True), (3.0, True), (None, True), (1.0, False)]


@pytest.mark.slow  # two TPU AOT compiles with libtpu
def test_search_ranks_real_compiles_with_step_time_keys():
    pytest.importorskip("libtpu")
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5e-4", "--search", "--time-budget", "1", "--json", *SMALL, "model.remat=full",
           "model.attention=splash"]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=600, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = json.loads(proc.stdout.strip().splitlines()[-1])["plans"]
    assert len(plans) == 1  # the budget is spent by the first compile: the config's own plan
    best = plans[0]
    assert best["plan"] == {"tensor": 1, "micro_batches": 2, "remat": "full",
                            "attention": "splash"}
    for key in ("predicted_step_seconds", "predicted_mfu", "compute_seconds", "memory_seconds",
                "exposed_collective_seconds", "estimated_mfu", "bytes_per_chip"):
        assert key in best
    assert best["predicted_step_seconds"] == pytest.approx(
        best["compute_seconds"] + best["memory_seconds"] + best["exposed_collective_seconds"])
    # The walk counts every layer and micro-batch (loops times their trip counts): per chip at
    # least the model's matmul FLOPs and at most remat's recompute on top (full: 4/3) plus the
    # causal half of attention the kernel's blocks still visit.
    model_per_chip = best["model_flops_per_step"] / best["chips"]
    assert model_per_chip <= best["hlo_flops_per_chip"] <= 2 * model_per_chip
    assert 0 < best["predicted_mfu"] < 1
    assert best["unknown_trip_counts"] == 0
    assert "best: mesh.tensor=1" in format_ranking(plans)
