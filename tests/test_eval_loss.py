"""eval-loss on a tiny HF model and its Orbax weights equals transformers' K2 loss, by hand."""

import copy
import json

import numpy as np
import pytest
import torch

import eval_fixtures as fx
from k2jax.cli import main
from k2jax.eval.rope_frequencies import round_hf_rope_frequencies


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def k2_rope_model(setup):
    """The fixture's transformers model with K2's training RoPE: inv_freq rounded to bf16."""
    return round_hf_rope_frequencies(copy.deepcopy(setup["model"]), "bfloat16")


def hand_loss(model, data_dir, step, use_tgt_mask=True, logits_dtype=torch.float32):
    """K2's loss of `step` from transformers' logits (rounded to `logits_dtype`, then fp64):
    sum(-log p(next) * mask) / sum(mask)."""
    tokens, masks = fx.reference_rows(data_dir, use_tgt_mask)
    rows = slice(step * fx.GLOBAL_BATCH, (step + 1) * fx.GLOBAL_BATCH)
    tokens, masks = tokens[rows], masks[rows]
    with torch.no_grad():
        logits = model(torch.as_tensor(tokens)).logits.to(logits_dtype).double().numpy()
    total = count = 0.0
    for b in range(len(tokens)):
        for i in range(fx.SEQ - 1):
            row = logits[b, i]
            log_norm = row.max() + np.log(np.exp(row - row.max()).sum())
            total += (log_norm - row[tokens[b, i + 1]]) * masks[b, i]
            count += masks[b, i]
    return total / count, count


def eval_loss(capsys, *args):
    code = main(["eval-loss", *args, "--order", "0,1", "--seq-len", str(fx.SEQ),
                 "--global-batch", str(fx.GLOBAL_BATCH), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("source,micro", [("hf", None), ("orbax", None), ("orbax", "3")])
def test_eval_loss_matches_transformers(setup, capsys, source, micro):
    weights = ["--hf", str(setup["hf"])] if source == "hf" else [
        "--checkpoint", str(setup["orbax"])]
    extra = ["--micro-batch", micro] if micro else []  # 3: padded to 6 rows, 2 micro-steps
    records = eval_loss(capsys, *weights, "--data", str(setup["data"]), "--steps", "0:2",
                        "--use-tgt-mask", "model.logits_dtype=float32",
                        "--rope-freq-dtype", "float32", *extra)  # stock transformers' RoPE
    assert [r["step"] for r in records] == [0, 1]
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:
        expected, count = hand_loss(setup["model"], setup["data"], record["step"])
        assert record["tokens"] == count
        assert abs(record["loss"] - expected) < 1e-5, (record, expected)
    # Step 1 has the row with a tgt_mask: fewer than 4 x 15 counted predictions.
    assert records[0]["tokens"] == 4 * (fx.SEQ - 1) > records[1]["tokens"]


def test_eval_loss_ignores_tgt_mask_by_default_as_k2_stage1(setup, capsys):
    records = eval_loss(capsys, "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                        "--steps", "1", "--rope-freq-dtype", "float32",
                        "model.logits_dtype=float32")
    expected, count = hand_loss(setup["model"], setup["data"], 1, use_tgt_mask=False)
    assert records[0]["tokens"] == count == 4 * (fx.SEQ - 1)  # the tgt_mask row counts fully
    assert abs(records[0]["loss"] - expected) < 1e-5


@pytest.mark.parametrize("flag", [[], ["--rope-freq-dtype", "bfloat16"]])
def test_eval_loss_default_is_k2s_bf16_rope_frequencies(setup, k2_rope_model, capsys, flag):
    """By default (and with the flag) eval-loss is K2 as trained: it equals transformers with
    bf16-rounded inv_freq and bf16-rounded logits (configs/k2-65b.yaml), and not stock
    transformers (3e-5 .. 1e-4 away on these rows)."""
    records = eval_loss(capsys, "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                        "--steps", "0:2", *flag)
    for record in records:
        assert record["rope_freq_dtype"] == record["logits_dtype"] == "bfloat16"
        expected, _ = hand_loss(k2_rope_model, setup["data"], record["step"], False,
                                torch.bfloat16)
        stock, _ = hand_loss(setup["model"], setup["data"], record["step"], False)
        assert abs(record["loss"] - expected) < 1e-5, (record, expected)
        assert abs(record["loss"] - stock) > 3e-5, (record, stock)


@pytest.mark.slow  # quick group time (~2.5 s; the bf16 RoPE default stays quick)
def test_eval_loss_rounds_logits_to_the_configs_logits_dtype(setup, k2_rope_model, capsys):
    """model.logits_dtype=bfloat16 (K2's, issue 26) rounds the logits before the fp32 loss:
    transformers' bf16-rounded logits give the loss, its fp32 ones do not (a shift of ~1e-4
    on these rows, 10x the tolerance)."""
    rounded, exact = (eval_loss(capsys, "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                                "--steps", "0", f"model.logits_dtype={dtype}")[0]["loss"]
                      for dtype in ("bfloat16", "float32"))
    expected, _ = hand_loss(k2_rope_model, setup["data"], 0, False, torch.bfloat16)
    fp32, _ = hand_loss(k2_rope_model, setup["data"], 0, False)
    assert abs(rounded - expected) < 1e-5 and abs(exact - fp32) < 1e-5
    assert abs(rounded - exact) > 1e-5, (rounded, exact)


@pytest.mark.slow  # quick group time (~2 s; the fp32 parity stays quick)
def test_eval_loss_bf16_close(setup, capsys):
    records = eval_loss(capsys, "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                        "--steps", "1", "--dtype", "bf16")
    expected, _ = hand_loss(setup["model"], setup["data"], 1, use_tgt_mask=False)
    assert abs(records[0]["loss"] - expected) < 0.05 * expected


@pytest.mark.parametrize("args,needle", [
    (["--hf", "/nonexistent/k2", "--data", "{data}", "--steps", "0"], "/nonexistent/k2"),
    (["--hf", "{hf}", "--data", "{data}", "--steps", "5:3"], "5:3"),
    (["--hf", "{hf}", "--data", "{data}", "--steps", "1,x"], "'x'"),
    (["--hf", "{hf}", "--data", "/nonexistent/d", "--steps", "0"], "/nonexistent/d"),
    (["--hf", "{hf}", "--data", "{data}", "--steps", "2"], "step 2"),  # past the 11 rows
    (["--checkpoint", "{data}", "--data", "{data}", "--steps", "0"], "not a k2jax weights"),
    (["--hf", "{hf}", "--data", "{data}", "--steps", "0", "data.reset_attention_mask=true"],
     "segments.npy"),  # packed data is evaluated, but these chunks have no segment ids
    (["--hf", "{hf}", "--steps", "0"], "--data DIR is required"),
    (["--steps", "0"], "give --hf DIR, --checkpoint DIR or --run-dir RUN"),
])
def test_eval_loss_bad_input_one_line_exit_2(setup, capsys, args, needle):
    args = [a.format(hf=setup["hf"], data=setup["data"]) for a in args]
    code = main(["eval-loss", *args, "--order", "0,1", "--seq-len", str(fx.SEQ),
                 "--global-batch", str(fx.GLOBAL_BATCH)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) == 1, err  # checked before loading
    assert err.startswith("k2jax eval-loss: error: ") and needle in err, err


@pytest.mark.slow  # 4 simulated devices: ~6 s idle
def test_eval_loss_sharded_over_4_devices(setup, k2_rope_model):
    """4 CPU devices (fsdp 2 x tensor 2), micro-batch 8 (the 4-row batch padded with masked
    rows): the same losses (default RoPE: K2's bf16 frequencies). A subprocess, since the
    device count is fixed at jax import."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-m", "k2jax.cli", "eval-loss", "--hf", str(setup["hf"]), "--data",
         str(setup["data"]), "--steps", "0,1", "--order", "0,1", "--seq-len", str(fx.SEQ),
         "--global-batch", str(fx.GLOBAL_BATCH), "--tensor-parallel", "2", "--micro-batch", "8",
         "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'fsdp': 2, 'tensor': 2" in out.stderr and "padded 4 -> 8 rows" in out.stderr
    for record in map(json.loads, out.stdout.splitlines()):
        expected, _ = hand_loss(k2_rope_model, setup["data"], record["step"],
                                use_tgt_mask=False, logits_dtype=torch.bfloat16)
        assert abs(record["loss"] - expected) < 1e-5


def test_eval_loss_takes_a_run_directory_as_checkpoint(setup, capsys, tmp_path):
    """`--checkpoint RUN` (what MaxText/Levanter users type) resolves once to the run's latest
    complete step, said in one line; a half-written (temporary) later step is skipped."""
    import shutil

    checkpoints = tmp_path / "run" / "checkpoints"
    for name in ("3", "7", "9.orbax-checkpoint-tmp-1"):
        shutil.copytree(setup["orbax"], checkpoints / name)
    code = main(["eval-loss", "--checkpoint", str(tmp_path / "run"), "--data",
                 str(setup["data"]), "--steps", "0", "--order", "0,1", "--seq-len",
                 str(fx.SEQ), "--global-batch", str(fx.GLOBAL_BATCH), "--json", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    lines = [line for line in captured.err.splitlines() if line.startswith("checkpoint:")]
    assert lines == [f"checkpoint: {tmp_path / 'run'} -> {checkpoints / '7'} (latest complete "
                     "step of 2)"]
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["eval-loss", "--checkpoint", str(empty), "--data", str(setup["data"]),
                 "--steps", "0"]) == 2
    assert "nor a run directory with a complete checkpoint" in capsys.readouterr().err


def test_eval_loss_any_batch_size_under_per_group(setup, capsys, k2_rope_model):
    """--global-batch 2 under K2's preset (per_group, groups of 4, a training key) is one group
    of 2 rows: with all-ones masks the same number as the global mean."""
    code = main(["eval-loss", "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                 "--steps", "0", "--order", "0,1", "--seq-len", str(fx.SEQ),
                 "--global-batch", "2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads(out)
    assert record["loss_normalization"] == "per_group" and record["rows"] == 2
    tokens, _ = fx.reference_rows(setup["data"], False)
    with torch.no_grad():
        logits = k2_rope_model(torch.as_tensor(tokens[:2])).logits.to(torch.bfloat16).double()
    nll = -torch.log_softmax(logits, -1)[:, :-1].gather(
        -1, torch.as_tensor(tokens[:2, 1:, None])).squeeze(-1)
    assert abs(record["loss"] - float(nll.mean())) < 1e-5


@pytest.mark.slow  # quick group time (~5 s)
def test_eval_loss_and_compare_hf_read_the_configs_synthetic_source(setup, capsys):
    """The config's data source, as `train` reads it (before, data.source was forced to k2 and
    a config without data.path failed): configs/tiny.yaml is synthetic."""
    from k2jax.config import load_config
    from k2jax.data.loader import StepLoader

    code = main(["eval-loss", "--hf", str(setup["hf"]), "--config", "tiny", "--steps", "0",
                 "--rope-freq-dtype", "float32", "--json", "--quiet"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["rows"] == 16
    config = load_config("tiny", ["model.vocab_size=250"])  # the weights' vocabulary
    tokens = StepLoader.from_config(config).global_batch(0)["tokens"]
    with torch.no_grad():
        logits = setup["model"](torch.as_tensor(tokens, dtype=torch.long)).logits.double()
    nll = -torch.log_softmax(logits, -1)[:, :-1].gather(
        -1, torch.as_tensor(tokens[:, 1:, None], dtype=torch.long)).squeeze(-1)
    assert abs(record["loss"] - float(nll.mean())) < 1e-5
    code = main(["compare-hf", "--hf", str(setup["hf"]), "--config", "tiny", "--step", "0",
                 "--rows", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"] and report["source"] == "step 0 of synthetic data"


@pytest.mark.slow  # trains 3 tiny steps (a subprocess), then one eval-loss: ~40 s idle
def test_eval_loss_run_dir_is_the_runs_data_config_and_training_loss(tmp_path, capsys):
    """`--run-dir RUN`: the run's config (synthetic data, fp32 RoPE) and, without --checkpoint,
    its latest checkpoint. Checkpoint 2's weights on step 2's rows give the loss the trainer
    logged for step 3 (metrics.jsonl numbers a step's loss by the update it made)."""
    from train_utils import losses_by_step, run_train

    run = tmp_path / "run"
    result = run_train(run, "train.steps=3", "train.checkpoint_every=2", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    code = main(["eval-loss", "--run-dir", str(run), "--checkpoint",
                 str(run / "checkpoints" / "2"), "--steps", "2", "--json", "--quiet"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["rope_freq_dtype"] == "float32"  # the run's, not K2's
    assert record["loss"] == pytest.approx(losses_by_step(run)[3], rel=2e-5)
    assert main(["eval-loss", "--run-dir", str(run), "--steps", "2", "--json", "--quiet"]) == 0
    assert f"-> {run}/checkpoints/3 (latest complete step of 2)" in capsys.readouterr().err
