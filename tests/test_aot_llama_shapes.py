"""`k2jax aot --config FILE --topology v6e-8 --json` on LLaMA-shaped configs written from scratch,
as a MaxText user (or issue 25's acceptance) writes them: GQA/MQA, vocab 128256, 8192 tokens,
data.per_device_batch_size, MaxText's custom remat with host offload, splash blocks with the fused backward, tied
and untied output, the run's XLA flags from the config. Small widths and 2 layers keep each
compile to minutes on a shared 2-core machine; the shapes that matter for the path (vocab,
sequence, heads, batch per device) are the real ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from k2jax.aot.calibration import errors_for
from k2jax.aot.run_estimate import three_figures
from train_utils import REPO, subprocess_env

pytestmark = pytest.mark.slow  # TPU AOT compiles with libtpu

FLAGS = ("--xla_tpu_enable_async_collective_fusion=true "
         "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
         "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
         "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")


def llama(tied: bool, kv_heads: int, per_device, remat: str, splash: dict, flags=FLAGS,
          offload: tuple = ()):
    """A config file's data, from scratch (no base:), in MaxText's terms."""
    return {
        "model": {"vocab_size": 128256, "hidden_size": 512, "intermediate_size": 1024,
                  "num_layers": 2, "num_heads": 4, "num_kv_heads": kv_heads, "head_dim": 128,
                  "rope_theta": 500000.0, "tie_word_embeddings": tied, "remat": remat,
                  "attention": "splash", **splash,
                  **({"remat_offload": list(offload)} if offload else {})},
        "data": {"seq_len": 8192, "per_device_batch_size": per_device},
        "train": {"gradient_dtype": "bfloat16", "xla_flags": flags, "steps": 1000},
    }


# MaxText's llama3_1_8b_8192 remat: custom, the layer input and q/k/v/out projections on host.
UNTIED = llama(False, 2, 1, "custom",
               {"attention_block_q": 2048, "attention_block_kv": 2048,
                "attention_backward_blocks": [2048, 2048, 2048, 2048],
                "attention_fused_backward": True},
               offload=("decoder_layer_input", "query_proj", "key_proj", "value_proj",
                        "attention_out"))
TIED = llama(True, 1, 0.5, "full", {})  # MQA; half a row per device: 4 rows on 8 chips


def aot(tmp_path, data: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(path), "--topology",
           "v6e-8", "--json", *extra]
    return subprocess.run(cmd, env=subprocess_env(), cwd=REPO, timeout=900,
                          capture_output=True, text=True)


def model_flops(data: dict, rows: int) -> float:
    """6 N + 6 L S H D per token, written out here from the config (k2jax/train/flops.py)."""
    m, seq = data["model"], data["data"]["seq_len"]
    e, d, h, k = m["hidden_size"], m["head_dim"], m["num_heads"], m["num_kv_heads"]
    n = m["num_layers"] * (e * d * (2 * h + 2 * k) + 3 * e * m["intermediate_size"])
    n += e * m["vocab_size"]  # the output layer: a matmul, tied or not
    return (6 * n + 6 * m["num_layers"] * seq * h * d) * rows * seq


@pytest.mark.parametrize("name, data, rows", [("untied", UNTIED, 8), ("tied", TIED, 4)])
def test_llama_shaped_config_predicts_mfu(tmp_path, name, data, rows):
    proc = aot(tmp_path, data, "--no-flops")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # The batch per device made rows for the slice's 8 devices; micro-batch = the whole batch.
    assert report["per_device_batch_size"] == data["data"]["per_device_batch_size"]
    assert (report["global_batch_size"], report["micro_batch_size"]) == (rows, rows)
    assert report["device_batch_rows"] == 8 and report["padding_rows"] == 8 - rows
    assert report["seq_len"] == 8192 and report["remat"] == data["model"]["remat"]
    assert report["attention"] == "splash" and report["xla_flags"] == FLAGS
    assert report["model_flops_per_step"] == pytest.approx(model_flops(data, rows))
    # What the acceptance reads.
    mfu, step = report["predicted_mfu"], report["predicted_step_seconds"]
    assert isinstance(mfu, float) and 0 < mfu < 1 and step > 0
    assert report["fits"] is True and 0 < report["bytes_per_chip"] < report["hbm_bytes_per_chip"]
    assert report["hbm_bytes_per_chip"] == 32 * 1024 ** 3
    # The calibration band comes from the recorded errors; the run from train.steps.
    low, high = report["predicted_step_band_seconds"]
    v6e = errors_for("v6e")  # a v6e plan gets the band of the v6e cases
    assert (low, high) == pytest.approx((step * (1 + min(v6e.values())),
                                         step * (1 + max(v6e.values()))))
    assert report["predicted_mfu_band"] == pytest.approx([mfu * step / high, mfu * step / low])
    assert report["calibration"]["cases"] == len(v6e)
    assert report["run_steps"] == 1000
    assert report["run_chip_hours"] == pytest.approx(1000 * step * 8 / 3600)
    assert report["predicted_mfu_full_attention"] > mfu
    if data["model"].get("remat_offload"):  # the offloaded tensors went to host memory
        assert report["host_transfer_seconds"] > 0
    from k2jax.aot.compile_report import format_report  # what the text form prints

    text = format_report(report)
    per_device = data["data"]["per_device_batch_size"]
    assert f"calibrated step {three_figures(low)}-{three_figures(high)} s" in text
    assert f"batch {rows} ({per_device} per device x 8) x 8192" in text
    assert "run of 1,000 steps" in text
    # The step line names every part that adds up to the step (host transfers when offloading).
    parts = ("compute_seconds", "memory_seconds", "exposed_collective_seconds",
             "exposed_host_transfer_seconds")
    assert sum(report[k] for k in parts) == pytest.approx(step)
    assert ("exposed host transfers" in text) == bool(report["host_transfer_seconds"])


def test_a_conflicting_global_batch_is_one_line(tmp_path):
    data = llama(False, 2, 1, "full", {})
    data["data"]["global_batch_size"] = 16  # 1 per device x 8 devices is 8
    proc = aot(tmp_path, data)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "k2jax aot: error: config key 'data.global_batch_size': 16 conflicts with "
        "data.per_device_batch_size=1 x 8 devices = 8; set one of them")


def test_a_start_up_only_flag_in_the_config_says_where_it_goes(tmp_path):
    """libtpu takes --xla_sc_disjoint_spmem only in LIBTPU_INIT_ARGS (MaxText's v6e recipes set
    it): in train.xla_flags it is one line pointing there, exit 2."""
    proc = aot(tmp_path, llama(False, 2, 1, "full", {}, "--xla_sc_disjoint_spmem=false"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("k2jax aot: error: config key 'train.xla_flags'") or line.startswith(
        "k2jax aot: error: train.xla_flags"), line
    assert "--xla_sc_disjoint_spmem" in line and "LIBTPU_INIT_ARGS" in line
