"""compare-hf: passes on a faithful conversion, fails (exit 1) on perturbed weights and shows
the layer where the stacks part; bad input is one line and exit 2."""

import json

import numpy as np
import pytest

import eval_fixtures as fx
from k2jax.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("compare_hf"))


def compare(capsys, *args):
    code = main(["compare-hf", *args, "--order", "0,1", "--seq-len", str(fx.SEQ),
                 "--global-batch", str(fx.GLOBAL_BATCH), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_faithful_conversion_passes_with_per_layer(setup, capsys):
    code, report, _ = compare(capsys, "--hf", str(setup["hf"]), "--data", str(setup["data"]),
                              "--step", "1", "--rows", "3", "--per-layer")
    assert code == 0 and report["passed"]
    assert report["rope_freq_dtype"] == "float32"  # the default: transformers' own RoPE
    assert report["rows"] == 3 and report["seq_len"] == fx.SEQ
    assert report["max_abs"] < 1e-4 and report["mean_kl"] < 1e-9
    assert report["top1_agreement"] == 1.0
    assert abs(report["loss_reference"] - report["loss_candidate"]) < 1e-5
    names = [row["name"] for row in report["per_layer"]]
    assert names[0] == "embeddings" and names[1] == "layer 0" and names[-1].startswith("final")
    assert max(row["max_abs"] for row in report["per_layer"]) < 1e-4
    assert report["parts_at"] is None


def test_orbax_checkpoint_and_token_ids_pass(setup, capsys, tmp_path):
    tokens = np.random.default_rng(5).integers(0, fx.VOCAB, (2, 12)).astype(np.int32)
    np.save(tmp_path / "ids.npy", tokens)
    code, report, _ = compare(capsys, "--hf", str(setup["hf"]), "--checkpoint",
                              str(setup["orbax"]), "--token-ids", str(tmp_path / "ids.npy"),
                              "--rows", "2")
    assert code == 0 and report["max_abs"] < 1e-4 and report["tokens"] == 2 * 11


@pytest.mark.slow  # quick group time (~3 s)
def test_bf16_rope_frequencies_round_both_stacks(setup, capsys):
    """--rope-freq-dtype bfloat16: transformers' inv_freq is rounded too, so the stacks still
    agree, on losses that differ from the float32 ones (the rounding took effect on both)."""
    rows = ["--hf", str(setup["hf"]), "--data", str(setup["data"]), "--step", "0", "--rows", "4"]
    code, k2_rope, _ = compare(capsys, *rows, "--rope-freq-dtype", "bfloat16")
    assert code == 0 and k2_rope["rope_freq_dtype"] == "bfloat16"
    assert k2_rope["max_abs"] < 1e-4
    assert abs(k2_rope["loss_reference"] - k2_rope["loss_candidate"]) < 1e-5
    _, stock, _ = compare(capsys, *rows)
    assert abs(k2_rope["loss_reference"] - stock["loss_reference"]) > 3e-5
    assert abs(k2_rope["loss_candidate"] - stock["loss_candidate"]) > 3e-5


def test_perturbed_weights_fail_and_show_the_layer(setup, capsys):
    code, report, err = compare(capsys, "--hf", str(setup["hf"]), "--checkpoint",
                                str(setup["perturbed"]), "--data", str(setup["data"]),
                                "--step", "0", "--per-layer")
    assert code == 1 and not report["passed"]
    assert "FAILED" in err and "--max-abs" in err
    by_name = {row["name"]: row["max_abs"] for row in report["per_layer"]}
    assert by_name["layer 0"] < 1e-5  # layer 1 (the last) was perturbed, layer 0 was not
    assert report["per_layer"][-1]["max_abs"] > 1e-2
    assert report["parts_at"].startswith("final norm (layer 1")
    assert "holds" not in err  # fp32 weights: no precision excuse


def test_bf16_checkpoint_failure_says_why(setup, capsys, tmp_path):
    """The README's path (hf-to-orbax --dtype bf16, then compare-hf with the default thresholds)
    fails on bf16 rounding alone: the failure says so instead of reading as a bad conversion."""
    assert main(["convert", "hf-to-orbax", "--hf", str(setup["hf"]), "--out",
                 str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    capsys.readouterr()
    code, report, err = compare(capsys, "--hf", str(setup["hf"]), "--checkpoint",
                                str(tmp_path / "bf16"), "--data", str(setup["data"]),
                                "--step", "0")
    assert code == 1 and report["max_abs"] > 1e-3
    assert "holds bfloat16 weights" in err and "--dtype fp32" in err


@pytest.mark.parametrize("args,needle", [
    (["--hf", "/nonexistent/k2", "--token-ids", "{ids}"], "/nonexistent/k2"),
    (["--hf", "{hf}"], "--token-ids"),  # no rows given
    (["--hf", "{hf}", "--token-ids", "/nonexistent/ids.npy"], "/nonexistent/ids.npy"),
    (["--hf", "{hf}", "--checkpoint", "{data}", "--token-ids", "{ids}"], "not a k2jax weights"),
])
def test_bad_input_one_line_exit_2(setup, capsys, tmp_path, args, needle):
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int32))
    args = [a.format(hf=setup["hf"], data=setup["data"], ids=tmp_path / "ids.npy") for a in args]
    code = main(["compare-hf", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("k2jax compare-hf: error")
    assert needle in err.splitlines()[-1]
