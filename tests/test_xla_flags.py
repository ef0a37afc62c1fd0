"""train.xla_flags (k2jax/aot/xla_flags.py): parsed into compiler options, honoured by an AOT
TPU compile on this CPU host (XLA's async collective fusion appears in the HLO and the step-time
model overlaps it), winning over LIBTPU_INIT_ARGS for the flags it names; a flag the compiler
does not take is one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from k2jax.aot.xla_flags import parse_xla_flags
from k2jax.errors import ConfigError
from train_utils import REPO, SMALL_MODEL, TINY, subprocess_env

ASYNC = ("--xla_tpu_enable_async_collective_fusion=true "
         "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
         "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
         "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
PLAN = SMALL_MODEL + ["mesh.fsdp=4", "data.micro_batch_size=8", "model.attention=xla",
                      "model.compute_dtype=bfloat16"]


def test_flags_parse_like_libtpu_init_args():
    assert parse_xla_flags("--xla_a=true  --xla_b=12 --xla_c") == {
        "xla_a": "true", "xla_b": "12", "xla_c": "true"}
    assert parse_xla_flags(None) == {} and parse_xla_flags("") == {}
    with pytest.raises(ConfigError, match="train.xla_flags"):
        parse_xla_flags("xla_a=true")


@pytest.mark.slow
def test_aot_compile_honours_the_flags_and_the_model_overlaps_the_fused_collectives(tmp_path):
    pytest.importorskip("libtpu")
    from k2jax.aot.compile_report import compile_report
    from k2jax.aot.topology import parse_slice
    from k2jax.config import load_config

    reports, texts = [], []
    for flags in ("", ASYNC):
        hlo = tmp_path / f"step{len(texts)}.hlo"
        config = load_config(TINY, PLAN + [f"train.xla_flags={flags}"])
        reports.append(compile_report(config, parse_slice("v5p-8"), measure_flops=False,
                                      hlo_out=str(hlo)))
        texts.append(hlo.read_text())
    plain, fused = texts
    assert "async-collective-start" not in plain
    assert fused.count("async-collective-start") > 0  # the FSDP all-gathers, now in fusions
    assert reports[1]["xla_flags"] == ASYNC
    # the same gathers, now overlapped with the fusions that carry them
    assert reports[1]["exposed_collective_seconds"] < reports[0]["exposed_collective_seconds"]


def _aot(tmp_path, flags: str, env_flags: str = ""):
    hlo = tmp_path / "step.hlo"
    env = {**subprocess_env(), "LIBTPU_INIT_ARGS": env_flags}
    cmd = [sys.executable, "-m", "k2jax.cli", "aot", "--config", str(TINY), "--topology",
           "v5p-8", "--json", "--no-flops", "--hlo-out", str(hlo), *PLAN,
           f"train.xla_flags={flags}"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    return proc, (hlo.read_text() if hlo.exists() else "")


@pytest.mark.slow
def test_config_flags_win_over_libtpu_init_args_and_a_rejected_flag_is_one_line(tmp_path):
    pytest.importorskip("libtpu")
    proc, text = _aot(tmp_path, "--xla_tpu_enable_async_collective_fusion=false", ASYNC)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "async-collective-start" not in text  # the environment asked for it, the config not
    os.remove(tmp_path / "step.hlo")
    proc, _ = _aot(tmp_path, "--xla_k2jax_no_such_flag=true")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.xla_flags" in last and "--xla_k2jax_no_such_flag" in last
    assert "Traceback" not in proc.stderr
