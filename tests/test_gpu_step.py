"""benchmarks/gpu_step.py --dry: the whole GPU benchmark (train step k2jax and PyTorch,
attention, numerics, generation) run on this CPU at tiny sizes, as it would run on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_utils import REPO, subprocess_env


@pytest.mark.slow  # five subprocesses each importing jax, torch and transformers: minutes
def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu_step.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_step.py"), "--dry", "--steps", "2",
         "--out", str(out)], env=subprocess_env(), cwd=tmp_path, capture_output=True,
        text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert not [name for name, part in parts.items() if "error" in part]
    assert set(parts) == {"train_jax", "train_torch", "attention", "numerics", "generate"}
    head = report["summary"]
    assert head["k2jax"]["tokens_per_s"] > 0 and head["pytorch"]["tokens_per_s"] > 0
    assert head["ratio_tokens_per_s"] == pytest.approx(
        head["k2jax"]["tokens_per_s"] / head["pytorch"]["tokens_per_s"])
    train = parts["train_jax"]
    assert train["remat"] == "full" and train["attention"] == "xla"  # CPU: auto -> xla
    assert train["losses"][-1] < train["losses"][0]  # the steps train
    numerics = parts["numerics"]
    assert numerics["fp32_logits_ok"] and numerics["float32"]["max_abs_logit_diff"] <= 1e-4
    assert numerics["bf16_loss_diff_k2jax"] < 0.05
    step = numerics["mesh_step"]
    assert step["ok"] and step["device"]["update_norm"] > 0
    assert [row["seq"] for row in parts["attention"]["rows"]] == [128, 256]
    assert {row["what"] for row in parts["generate"]["rows"]} == {
        "decode tokens/s", "loglikelihood requests/s"}
    assert "k2jax / PyTorch tokens/s" in result.stdout


def test_out_of_memory_is_recognised():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_step import out_of_memory

    assert out_of_memory({"error": "jaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"})
    assert out_of_memory({"error": "torch.OutOfMemoryError: CUDA out of memory. Tried to"})
    assert not out_of_memory({"error": "ValueError: bad shape"}) and not out_of_memory({})
