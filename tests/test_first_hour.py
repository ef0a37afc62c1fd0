"""A user's first hour (issue 27): the messages, help texts and rules a newcomer meets after the
quick start. Each test states the problem it fixed ("Before: ...")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from k2jax.cli import main
from k2jax.tokenizer import K2Tokenizer, sentencepiece_file, tokenizer_files
from k2jax.errors import UserError
from test_data_prepare import random_text, spm_model  # noqa: F401  (a SentencePiece fixture)


def run(argv) -> int:
    return main([str(a) for a in argv])


def error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_unknown_flag_prints_the_subcommands_usage(capsys):
    """Before: the top-level usage (`usage: k2jax [-h] [--version] COMMAND ...`)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare-chat", "--tokenizer", "t", "--input", "i", "--out", "o",
              "--bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: k2jax data prepare-chat ")
    assert "k2jax data prepare-chat: error: unrecognized arguments: --bogus" in err


def test_errors_name_the_subcommand(capsys, tmp_path):
    """Before: `k2jax data: error: ...` for any data subcommand."""
    err = error_line(capsys, ["data", "prepare-chat", "--tokenizer", tmp_path / "none.model",
                              "--input", "i", "--out", tmp_path / "o"])
    assert err.startswith("k2jax data prepare-chat: error: ")
    assert "none.model: tokenizer not found" in err and err.count("\n") == 1


def test_every_option_shows_its_default(capsys):
    """Before: `generate --help` showed `--max-new-tokens N` and `--seed SEED` without theirs."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens N tokens generated per prompt at most (default: 64)" in out
    assert "--seed SEED seed of the sampling (--temperature > 0) (default: 0)" in out


def test_prepare_chat_help_shows_its_own_defaults_once(capsys):
    """Before: the config's default twice, and --seq-len's as K2-65B's 2048."""
    with pytest.raises(SystemExit):
        main(["data", "prepare-chat", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("(default: k2-chat)") == 1 and "K2-Chat's) (default" in out
    assert "k2-chat: 8192" in out and "k2-65b: 2048" not in out


def test_tokenizer_is_a_model_file_or_a_directory_everywhere(spm_model, tmp_path):
    """Before: a directory was refused by `data prepare` and a .model file by `convert
    orbax-to-hf --tokenizer`; a missing file said "expected a SentencePiece .model file"."""
    directory = tmp_path / "tok"
    directory.mkdir()
    shutil.copy(spm_model, directory / "tokenizer.model")
    assert K2Tokenizer(directory).sp_size == K2Tokenizer(spm_model).sp_size
    assert tokenizer_files(spm_model) == [str(spm_model)]
    assert tokenizer_files(directory) == [str(directory / "tokenizer.model")]
    assert sentencepiece_file(directory) == str(directory / "tokenizer.model")
    with pytest.raises(UserError, match="missing.model: tokenizer not found"):
        K2Tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no tokenizer files in this directory"):
        tokenizer_files(tmp_path / "empty")
    hf_only = tmp_path / "hf_only"
    hf_only.mkdir()
    (hf_only / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="hf_only: no tokenizer.model in this directory"):
        K2Tokenizer(hf_only)


def test_data_prepare_output_is_indexed_and_trainable(spm_model, tmp_path, capsys):
    """Before: the next command failed with `not indexed` until `k2jax data index`."""
    import random

    text = tmp_path / "notes.txt"
    text.write_text(random_text(random.Random(3), 400))
    out = tmp_path / "mine"
    assert run(["data", "prepare", "--tokenizer", spm_model, "--input", text, "--out", out,
                 "--num-chunks", "2", "--seq-len", "16", "--quiet"]) == 0
    assert "indexed" in capsys.readouterr().out
    assert sorted(p.name for p in (out / ".k2index").glob("chunk_*.json")) == [
        "chunk_0.json", "chunk_1.json"]
    assert run(["data", "batch", "--data", out, "--order", "0,1", "--step", "0",
                 "--global-batch", "2", "--seq-len", "16", "--vocab-size", "318",
                 "--out", tmp_path / "b.npy"]) == 0, capsys.readouterr().err


def test_data_prepare_says_when_chunks_are_empty(spm_model, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox")  # one short document: one row at most
    assert run(["data", "prepare", "--tokenizer", spm_model, "--input", text, "--out",
                tmp_path / "o", "--num-chunks", "4", "--seq-len", "16", "--quiet"]) == 0
    assert "of the 4 chunk files hold no row" in capsys.readouterr().err


def test_prepare_chat_refuses_more_chunks_than_rows(spm_model, tmp_path, capsys):
    """Before: `--num-chunks 2` on conversations packing into one row wrote an empty
    chunk_0.jsonl, rc 0."""
    chats = tmp_path / "c.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "fox"},
                                              {"role": "assistant", "content": "dog"}]}) + "\n")
    err = error_line(capsys, ["data", "prepare-chat", "--tokenizer", spm_model, "--input", chats,
                              "--out", tmp_path / "o", "--num-chunks", "2",
                              "model.vocab_size=336", "data.seq_len=32"])
    assert ("pack into 1 rows of data.seq_len=32, fewer than --num-chunks (2; every chunk file "
            "needs a row): give --num-chunks <= 1") in err
    assert not (tmp_path / "o").exists()  # a refused start writes nothing


def test_eval_tasks_help_puts_k2jaxs_model_args_first(capsys):
    """Before: lm-eval's help alone (`--model ... default: hf`); nothing named hf=/checkpoint=."""
    assert main(["eval-tasks", "--help"]) == 0
    out = capsys.readouterr().out
    ours = out.index("k2jax's model_args")
    assert ours < out.index("lm-eval run")
    for key in ("hf=DIR", "checkpoint=DIR", "tokenizer=PATH", "dtype=fp32|bf16", "tensor=N",
                "give hf=DIR or checkpoint=DIR", "--include_path DIR", "HF_DATASETS_OFFLINE"):
        assert key in out[:out.index("lm-eval run")], key


def test_eval_tasks_without_weights_is_one_line_at_once(capsys):
    """Before: lm-eval indexed its tasks and loaded the model, then asked for `tokenizer=PATH
    ... with checkpoint=`."""
    import time

    began = time.monotonic()
    err = error_line(capsys, ["eval-tasks", "--tasks", "hellaswag", "--model_args", "dtype=bf16"])
    assert err == ("k2jax eval-tasks: error: --model_args: give hf=DIR or checkpoint=DIR (the "
                   "weights to evaluate; k2jax eval-tasks --help lists the other keys)\n")
    assert time.monotonic() - began < 5


def test_eval_tasks_refuses_an_unknown_model_arg_at_once(capsys):
    """Before: `tensr=8` (or any typo) was swallowed by the backend and the run went on with
    the defaults."""
    err = error_line(capsys, ["eval-tasks", "--tasks", "tiny_qa", "--model_args",
                              "hf=x,tensr=8,dtype=fp32"])
    assert err.startswith("k2jax eval-tasks: error: --model_args: unknown key(s) tensr "
                          "(k2jax's: checkpoint, hf, tokenizer,"), err


def test_the_backend_takes_exactly_its_model_args():
    """MODEL_ARGS (what eval-tasks checks) is the backend's parameter list; a key past it,
    given programmatically, is refused by the backend itself."""
    import inspect

    from k2jax.lm_eval import MODEL_ARGS
    from k2jax.lm_eval.backend import K2JaxLM

    parameters = inspect.signature(K2JaxLM.__init__).parameters
    assert [n for n, p in parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD][1:] == \
        list(MODEL_ARGS)
    with pytest.raises(UserError, match="unknown key\\(s\\) tensr"):
        K2JaxLM(hf="x", tensr=8)


def test_an_unreachable_hub_turns_datasets_offline(monkeypatch, capsys):
    from k2jax.commands import eval_tasks

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert not eval_tasks.hub_reachable(timeout=1)
    eval_tasks.go_offline_without_hub()
    import os

    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    assert "the Hugging Face Hub is unreachable" in capsys.readouterr().err


@pytest.mark.slow  # lm-eval indexes its ~10k task files (~20 s) and loads the model
def test_a_hub_task_without_the_hub_is_one_line(tmp_path):
    """Before: a 45-line ConnectionError traceback after half a minute of retries."""
    import os
    import subprocess
    import sys

    from lm_eval_fixtures import build_checkpoint

    build_checkpoint(tmp_path / "hf")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a Hub nobody answers for
    result = subprocess.run([sys.executable, "-m", "k2jax.cli", "eval-tasks", "--model_args",
                             f"hf={tmp_path / 'hf'}", "--tasks", "hellaswag", "--limit", "2"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("k2jax eval-tasks: error: Couldn't reach 'Rowan/hellaswag'"), last
    assert "--include_path DIR" in last and "HF_DATASETS_OFFLINE=1" in last


def test_library_errors_name_parameters_and_commands_name_flags(capsys):
    """Issue 29.5: library modules raised `--top-p ...` also when called from Python."""
    from k2jax.generate.sampling import SamplingParams

    with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0).validate()
    err = error_line(capsys, ["generate", "--hf", "none", "--prompt", "x", "--top-p", "0"])
    assert err == "k2jax generate: error: --top-p must be in (0, 1], got 0.0\n"


def test_no_library_module_words_cli_flags():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "k2jax"
    found = [f"{path.relative_to(root)}:{number}" for path in root.rglob("*.py")
             if "commands" not in path.parts and path.name != "cli.py"
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"""UserError\(f?["'][^"']*--[a-z]""", line)]
    assert not found, found


def test_convert_says_force_as_the_flag(tmp_path, capsys):
    """atomic_write names its parameter (force=True); convert's user reads the flag."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lm_eval_fixtures import build_checkpoint

    build_checkpoint(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    err = error_line(capsys, ["convert", "hf-to-orbax", "--hf", tmp_path / "hf", "--out",
                              tmp_path / "out"])
    assert err.endswith("out: output directory exists; --force replaces it\n"), err


def test_ids_past_the_tokenizer_are_never_chosen():
    """Before: `generate` with a model vocabulary larger than the tokenizer's (K2: 32032 rows,
    32018 tokens; the tiny run: 32032 rows, a 318-token test tokenizer) failed after decoding."""
    import jax
    import jax.numpy as jnp

    from k2jax.generate.sampling import SamplingParams, next_tokens

    logits = jnp.zeros((2, 10)).at[:, 8].set(5.0).at[:, 3].set(1.0)
    key = jax.random.PRNGKey(0)
    assert next_tokens(logits, key, **SamplingParams().as_arrays()).tolist() == [8, 8]
    limited = SamplingParams(vocab_limit=6).as_arrays()
    assert next_tokens(logits, key, **limited).tolist() == [3, 3]
    sampled = SamplingParams(temperature=5.0, vocab_limit=6).as_arrays()
    draws = [next_tokens(logits, jax.random.PRNGKey(i), **sampled) for i in range(20)]
    assert max(int(d.max()) for d in draws) < 6


def test_eval_loss_quiet_prints_no_more_than_without(tmp_path, capsys):
    """Before: --quiet repeated every step's loss on stderr (15 more lines for 15 steps)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import eval_fixtures as fx

    setup = fx.build(tmp_path)
    capsys.readouterr()
    base = ["eval-loss", "--hf", setup["hf"], "--data", setup["data"], "--order", "0,1",
            "--seq-len", fx.SEQ, "--global-batch", fx.GLOBAL_BATCH, "--steps", "0:2"]
    lines = {}
    for flag in ([], ["--quiet"]):
        assert run(base + flag) == 0
        captured = capsys.readouterr()
        lines[bool(flag)] = (captured.out.count("\n"), captured.err.count("\n"))
    assert lines[True][0] == lines[False][0] == 2  # one result line per step, on stdout
    assert lines[True][1] < lines[False][1], lines  # and no line per weight tensor


def test_a_refused_train_start_writes_nothing(tmp_path, capsys):
    """Before: runs/NAME/checkpoints/ was left behind, empty, by any refused start."""
    fresh, existing = tmp_path / "runs" / "fresh", tmp_path / "existing"
    existing.mkdir()
    for run_dir in (fresh, existing):
        err = error_line(capsys, ["train", "--config", "tiny", f"train.run_dir={run_dir}",
                                  f"train.init_from={tmp_path / 'no-weights'}", "train.steps=1"])
        assert err.endswith("no-weights: not found\n"), err
    assert not fresh.exists() and list(existing.iterdir()) == []


def test_a_refused_prepare_leaves_no_out_directory(spm_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    err = error_line(capsys, ["data", "prepare", "--tokenizer", spm_model, "--input", bad,
                              "--out", tmp_path / "out", "--seq-len", "16", "--quiet"])
    assert "bad.jsonl:2: malformed JSON" in err
    assert not (tmp_path / "out").exists()


REPO = Path(__file__).resolve().parent.parent


def test_readme_output_directories_are_ignored_by_git():
    """Before: .gitignore lacked weights/ and exports/, where the README writes."""
    ignored = set(REPO.joinpath(".gitignore").read_text().split())
    assert {"runs/", "weights/", "exports/"} <= ignored


def test_env_file_header_names_the_readmes_path():
    """Before: gcp/k2.env's header said K2_ENV=runs/my-run.env, the README my-run.env."""
    readme = REPO.joinpath("README.md").read_text()
    header = REPO.joinpath("gcp/k2.env").read_text().split("\n\n")[0]
    command = "cp gcp/k2.env my-run.env && $EDITOR my-run.env && export K2_ENV=$PWD/my-run.env"
    assert command in readme and command in header


def test_tpu_pods_cites_the_libtpu_its_figures_were_measured_with():
    """Before: libtpu 0.0.52 above figures measured with 0.0.42.1 (jax 0.10.2's pin)."""
    import re

    cited = set(re.findall(r"libtpu (\d+\.\d+\.\d+(?:\.\d+)?)",
                           REPO.joinpath("docs/tpu_pods.md").read_text()))
    pinned = re.search(r"jax\[tpu\]==0\.10\.2 pins libtpu (\d+\.\d+\.\d+)\.\*",
                       REPO.joinpath("pyproject.toml").read_text()).group(1)
    assert cited and all(v.startswith(pinned) for v in cited), (cited, pinned)


@pytest.mark.parametrize("override, key, text", [
    ("optimizer.peak_lr=-1", "optimizer.peak_lr", "must be positive, got -1"),
    ("data.prefetch=-1", "data.prefetch", "must be >= 0, got -1"),
    ("data.worker_count=-2", "data.worker_count", "must be >= 0, got -2"),
    ("mesh.rules.embedd=tensor", "mesh.rules.embedd",
     "unknown logical axis (known: batch, length, vocab, embed, heads, kv_heads, head_dim, mlp, "
     "layers, norm)"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps", "must be >= 0, got -1"),
    ("train.steps=abc", "train.steps", "expected int or 'auto', got 'abc'"),
])
def test_config_errors_name_the_key_given(override, key, text):
    """Before: peak_lr=-1 blamed optimizer.min_lr, prefetch=-1 data.worker_count, and a
    mistyped logical axis (embedd) was accepted as a rule nothing uses."""
    from k2jax.config import ConfigError, load_config

    with pytest.raises(ConfigError) as raised:
        load_config("tiny", [override])
    assert str(raised.value).startswith(f"config key '{key}'") and text in str(raised.value), \
        str(raised.value)


def test_compare_curves_takes_another_run_as_reference(tmp_path, capsys):
    """The README's walk-through compares a rerun with the quick start's run: --reference takes
    a run directory or .jsonl as --run does (before: a W&B CSV only)."""
    for name, shift in (("a", 0.0), ("b", 0.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 3.0 - s / 100 + shift}) + "\n" for s in (10, 20, 30)))
    assert run(["compare-curves", "--run", tmp_path / "b", "--reference", tmp_path / "a",
                "--threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert "common steps       3" in out and "mean |difference|  0.250000" in out
    assert run(["compare-curves", "--run", tmp_path / "b", "--reference",
                tmp_path / "a" / "metrics.jsonl", "--threshold", "0.1"]) == 1  # parted: exit 1
    capsys.readouterr()
    err = error_line(capsys, ["compare-curves", "--run", tmp_path / "b", "--reference",
                              tmp_path / "none.jsonl"])
    assert "--reference" in err and "none.jsonl: no such file" in err
