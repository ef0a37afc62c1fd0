"""One CLI convention: --config plus key=value (old flags as aliases), K2's figures only in
configs/, both dtype spellings, --quiet = --no-progress, defaults and an example in every
--help, outputs that respect the umask, progress lines."""

from __future__ import annotations

import io
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_fixtures import SEQ_LEN, write_chunk
from k2jax.cli import build_parser, main
from k2jax.config import PRESET_DIR, load_config
from k2jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]

COMMANDS = [["train"], ["aot"], ["eval-loss"], ["compare-hf"], ["compare-curves"],
            ["convert", "hf-to-orbax"], ["convert", "orbax-to-hf"], ["data", "index"],
            ["data", "pack"], ["data", "batch"], ["data", "locate"], ["data", "order"],
            ["data", "prepare"], ["generate"]]
# Commands with a progress bar: each takes both spellings of the switch.
PROGRESS = [["eval-loss", "--hf", "h", "--steps", "0"], ["convert", "hf-to-orbax", "--hf", "h",
            "--out", "o"], ["convert", "orbax-to-hf", "--checkpoint", "c", "--out", "o"],
            ["data", "index", "d"], ["data", "pack", "--out", "o"],
            ["data", "prepare", "--tokenizer", "t", "--input", "i", "--out", "o"]]


def test_k2_figures_live_only_in_configs():
    """K2's global batch, padded vocabulary and hidden size are written nowhere in the code:
    k2jax/, benchmarks/ and tools/ read them from configs/k2-65b.yaml. The step-model
    calibration builds other published models (MaxText's, hidden 8192): not K2's figures."""
    not_k2 = {Path("benchmarks/calibrate_step_model.py")}
    found = []
    for top in ("k2jax", "benchmarks", "tools"):
        for dirpath, dirnames, filenames in os.walk(REPO / top):  # k2jax/configs: a link
            dirnames[:] = [d for d in dirnames if d not in ("configs", "__pycache__")]
            for name in filenames:
                path = Path(dirpath) / name
                if path.relative_to(REPO) in not_k2:
                    continue
                for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                    if re.search(r"(?<!\d)(2040|32032|8192)(?!\d)", line):
                        found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_presets_are_the_repository_configs_and_load_by_name():
    assert PRESET_DIR.resolve() == (REPO / "configs").resolve()  # one copy of each file
    assert load_config("k2-65b").to_dict() == load_config(REPO / "configs/k2-65b.yaml").to_dict()
    assert load_config("k2-chat.yaml").data.seq_len == 8192
    with pytest.raises(UserError, match="nor a preset: k2-65b, k2-chat"):
        load_config("k2-66b")


def test_dataclass_defaults_are_not_k2s():
    neutral, k2 = load_config(None), load_config("k2-65b")
    for key in ("model.vocab_size", "model.hidden_size", "data.global_batch_size",
                "optimizer.decay_steps", "train.steps", "data.order"):
        section, name = key.split(".")
        assert getattr(getattr(neutral, section), name) != getattr(getattr(k2, section), name), key


def test_order_override_takes_comma_separated_ids():
    assert load_config(None, ["data.order=0,1,2,3"]).data.order == [0, 1, 2, 3]
    assert load_config(None, ["data.order=[4, 5]"]).data.order == [4, 5]
    assert load_config(None, ["data.order=k2-stage2"]).data.order == "k2-stage2"
    with pytest.raises(UserError, match="data.order"):
        load_config(None, ["data.order=1,x"])


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_shows_defaults_and_an_example(capsys, argv):
    text = _help(capsys, argv)
    assert "default" in text and "example:\n  k2jax " + argv[0] in text


@pytest.mark.parametrize("argv", PROGRESS, ids=lambda a: " ".join(a[:2]))
@pytest.mark.parametrize("flag", ["--quiet", "--no-progress"])
def test_quiet_and_no_progress_are_one_switch(argv, flag):
    assert build_parser().parse_args([*argv, flag]).progress == "none"
    assert build_parser().parse_args(argv).progress == "auto"
    assert build_parser().parse_args([*argv, "--progress", "lines"]).progress == "lines"


@pytest.mark.parametrize("argv, dest, given, parsed", [
    (["eval-loss", "--hf", "h", "--steps", "0"], "dtype", "float32", "fp32"),
    (["eval-loss", "--hf", "h", "--steps", "0"], "dtype", "bf16", "bf16"),
    (["eval-loss", "--hf", "h", "--steps", "0"], "rope_freq_dtype", "bf16", "bfloat16"),
    (["compare-hf", "--hf", "h"], "rope_freq_dtype", "float32", "float32"),
    (["convert", "hf-to-orbax", "--hf", "h", "--out", "o"], "dtype", "fp16", "fp16"),
    (["convert", "hf-to-orbax", "--hf", "h", "--out", "o"], "dtype", "bfloat16", "bf16"),
    (["convert", "orbax-to-hf", "--checkpoint", "c", "--out", "o"], "dtype", "float16", "fp16"),
])
def test_dtype_flags_take_both_spellings(argv, dest, given, parsed):
    flag = "--" + dest.replace("_", "-")
    assert getattr(build_parser().parse_args([*argv, flag, given]), dest) == parsed


def test_dtype_flag_refuses_what_the_command_cannot_compute(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval-loss", "--hf", "h", "--steps", "0", "--dtype", "fp16"])
    assert "expected one of fp32|float32, bf16|bfloat16, got 'fp16'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chunks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chunks")
    for chunk_id, lines in ((0, 5), (1, 7), (2, 6)):
        write_chunk(directory, chunk_id, lines)
    return directory


def _run(capsys, *argv):
    code = main([*map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_index_takes_data_flag_or_positional(chunks, tmp_path, capsys):
    code, out, _ = _run(capsys, "data", "index", "--data", chunks, "--index-dir", tmp_path / "a",
                        "--quiet")
    assert code == 0 and "indexed 3 files" in out
    code, out, _ = _run(capsys, "data", "index", chunks, "--index-dir", tmp_path / "b",
                        "--no-progress")
    assert code == 0 and "indexed 3 files" in out
    code, _, err = _run(capsys, "data", "index", chunks, "--data", tmp_path, "--quiet")
    assert code == 2 and "give the directory once" in err


def test_data_commands_take_config_overrides_like_their_flags(chunks, tmp_path, capsys):
    assert _run(capsys, "data", "index", "--data", chunks, "--quiet")[0] == 0
    flags = ["--data", chunks, "--step", 2, "--global-batch", 4, "--seq-len", SEQ_LEN,
             "--order", "0,1,2"]
    code, by_flags, _ = _run(capsys, "data", "locate", *flags)
    assert code == 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"base": str(REPO / "configs/k2-65b.yaml"),
                                      "data": {"path": str(chunks), "seq_len": SEQ_LEN}}))
    code, by_config, _ = _run(capsys, "data", "locate", "--config", config, "--step", 2,
                              "data.global_batch_size=4", "data.order=0,1,2")
    assert code == 0 and json.loads(by_config) == json.loads(by_flags)
    assert json.loads(by_flags)["global_rows_start"] == 8
    out = tmp_path / "b.npy"
    code, _, _ = _run(capsys, "data", "batch", "--config", config, "--step", 2, "--out", out,
                      "data.global_batch_size=4", "data.order=0,1,2")
    assert code == 0 and np.load(out)[:, :2].tolist() == [[1, 3], [1, 4], [1, 5], [1, 6]]
    # The same key twice (flag and override) is refused; so is a run without files named.
    code, _, err = _run(capsys, "data", "locate", *flags, "data.global_batch_size=8")
    assert code == 2 and "--global-batch and data.global_batch_size" in err
    code, _, err = _run(capsys, "data", "locate", "--step", 0)
    assert code == 2 and "--data DIR is required" in err


def test_outputs_respect_the_umask(tmp_path):
    from k2jax.atomic_write import atomic_output_dir

    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "weights", force=False) as staging:
            (staging / "f").write_bytes(b"x")
        mode = stat.S_IMODE((tmp_path / "weights").stat().st_mode)
        assert mode == 0o755, oct(mode)
        pytest.importorskip("matplotlib")
        from k2jax.eval import curves

        curve = curves.Curve("c", np.arange(3), np.ones(3))
        curves.plot_curves(curve, curve, tmp_path / "p.png", 0.05)
        assert stat.S_IMODE((tmp_path / "p.png").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_elapsed_ticker_says_what_and_how_long():
    from k2jax.progress import elapsed_ticker

    stream = io.StringIO()
    with elapsed_ticker("aot: compiling (slow)", every_s=0.01, stream=stream):
        import time

        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "aot: compiling (slow) ..." and re.match(r"  \.\.\. \d+ s", lines[1])
    assert re.fullmatch(r"aot: compiling: done in 0\.\d s", lines[-1])


@pytest.mark.slow
def test_resumed_run_says_from_which_step(tmp_path, capsys):
    from train_utils import small_config

    from k2jax.train.trainer import Trainer

    Trainer(small_config(tmp_path, "train.steps=2", "train.checkpoint_every=2")).run()
    capsys.readouterr()
    Trainer(small_config(tmp_path, "train.steps=2")).initial_state()
    assert "resumed from step 2" in capsys.readouterr().err


def test_hf_to_orbax_stores_fp16_and_its_output_respects_the_umask(tmp_path):
    pytest.importorskip("torch")
    from convert_fixtures import (hf_config, hf_state, read_safetensors_dir, state_bits,
                                  tiny_hf_model, write_hf_dir)

    from k2jax.checkpoint.params_io import read_model_config

    model = tiny_hf_model()
    state = hf_state(model, "fp16")
    src = write_hf_dir(tmp_path / "hf", state, hf_config(model), "safetensors", 1)
    old = os.umask(0o022)
    try:
        assert main(["convert", "hf-to-orbax", "--hf", str(src), "--out", str(tmp_path / "w"),
                     "--dtype", "float16", "--quiet"]) == 0
        assert main(["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "w"), "--out",
                     str(tmp_path / "back"), "--dtype", "fp16", "--quiet"]) == 0
    finally:
        os.umask(old)
    assert read_model_config(str(tmp_path / "w")).param_dtype == "float16"
    back, source = read_safetensors_dir(tmp_path / "back"), state_bits(state)
    for name in source:
        np.testing.assert_array_equal(back[name], source[name], err_msg=name)
    for out in (tmp_path / "w", tmp_path / "back"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o755, out
        files = [p for p in out.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), out


def _readme_commands() -> list[list[str]]:
    """Every `k2jax ...` command line of README.md's code blocks (continuations joined,
    comments and pipes dropped), as argv."""
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    blocks = text.split("```")[1::2]  # the insides of the fences
    commands = []
    for line in "\n".join(blocks).splitlines():
        line = line.strip()
        if line.startswith("k2jax ") and "--version" not in line:
            words = shlex.split(line.split(" #")[0].split(" |")[0].split(" >")[0])
            commands.append(words[1:])
    return commands


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda a: " ".join(a[:3]))
def test_readme_examples_parse(argv):
    assert callable(build_parser().parse_args(argv).func)


def test_data_commands_read_rows_longer_than_the_configs_context(tmp_path, capsys):
    """No model runs in `data batch`: K2's 2048-token context does not limit --seq-len."""
    for chunk_id in (0, 1):
        write_chunk(tmp_path, chunk_id, 3, seq_len=4096)
    assert _run(capsys, "data", "index", "--data", tmp_path, "--quiet")[0] == 0
    code, out, err = _run(capsys, "data", "batch", "--data", tmp_path, "--step", 1, "--out",
                          tmp_path / "b.npy", "--seq-len", 4096, "--global-batch", 2,
                          "--order", "0,1")
    assert code == 0, err
    assert np.load(tmp_path / "b.npy").shape == (2, 4096)


def test_missing_weights_directory_is_not_found(tmp_path, capsys):
    """Before: `train.init_from=/nope` (and convert --checkpoint /nope) said "not a k2jax
    weights directory (no params/) nor ..." of a path that does not exist."""
    from k2jax.cli import main

    missing = tmp_path / "nope"
    assert main(["convert", "orbax-to-hf", "--checkpoint", str(missing), "--out",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"k2jax convert orbax-to-hf: error: {missing}: not found\n"
    from k2jax.checkpoint.params_io import weights_kind
    from k2jax.errors import UserError

    with pytest.raises(UserError, match=f"^{missing}: not found$"):
        weights_kind(str(missing))
    assert not (tmp_path / "out").exists()


def test_every_option_of_every_command_says_what_it_is():
    """README: every command has --help. Before: data pack/batch/locate/prepare --out, --step,
    compare-curves --run and generate --max-new-tokens/--seed had no text."""
    import argparse

    from k2jax.cli import build_parser

    silent = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif not action.help and action.dest != "help":
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "k2jax")
    assert not silent, silent
