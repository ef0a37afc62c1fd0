"""`k2jax generate` end to end on a tiny Hugging Face checkpoint with its own tokenizer, and its
bad inputs (one line, exit 2); `k2jax eval-tasks` refusing an unknown task."""

from __future__ import annotations

import json

import pytest
import torch

from k2jax.cli import main
from lm_eval_fixtures import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("generate") / "hf", max_positions=32)


def hf_greedy_ids(directory, text: str, new: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    # k2jax generate never picks an id the tokenizer cannot decode (the model's embedding is
    # larger than this word tokenizer): the same mask on transformers' side.
    undecodable = list(range(len(tokenizer), model.config.vocab_size)) or None
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         suppress_tokens=undecodable)
    row = out[0, ids.shape[1]:].tolist()
    return row[:row.index(2) + 1] if 2 in row else row


@pytest.mark.slow  # two CLI runs, each compiling prefill and decode
def test_generate_json_equals_transformers(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["the quick brown fox", "one two", "red green blue sky sea and"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    assert main(["generate", "--hf", str(checkpoint), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--dtype", "fp32", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == texts
    for record in records:
        assert record["token_ids"] == hf_greedy_ids(checkpoint, record["prompt"], 8)
        assert record["finish_reason"] in ("eos", "length")
    assert main(["generate", "--hf", str(checkpoint), "--prompt", texts[0],
                 "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == texts[0] + records[0]["text"]


def error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow  # quick group time (~6 s; test_generate's bad-input test stays quick)
def test_generate_bad_input(checkpoint, tmp_path, capsys):
    base = ["generate", "--hf", str(checkpoint)]
    assert "prompt 0: 40 tokens + --max-new-tokens 4 exceed the model's context of 32" in \
        error_line(capsys, base + ["--prompt", "dog " * 40, "--max-new-tokens", "4"])
    small = build_checkpoint(tmp_path / "small", max_positions=32)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 40  # the word tokenizer has 46 tokens
    (small / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # save_pretrained's progress bar
    assert "46 tokens do not fit the model's vocabulary of 40" in error_line(
        capsys, ["generate", "--hf", str(small), "--prompt", "dog"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a k2jax weights directory (no params/)" in error_line(
        capsys, ["generate", "--checkpoint", str(empty), "--tokenizer", str(checkpoint),
                 "--prompt", "dog"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "dog"}\n{"text": "cat"}\n')
    assert f"--prompts {bad} line 2: expected a JSON object with a \"prompt\" string" in \
        error_line(capsys, base + ["--prompts", str(bad)])
    assert "--top-p must be in (0, 1]" in error_line(capsys, base + ["--prompt", "dog",
                                                                     "--top-p", "0"])
    assert "generate takes mesh.* settings only" in error_line(
        capsys, base + ["--prompt", "dog", "model.num_layers=3"])
    assert "--tokenizer" in error_line(capsys, ["generate", "--checkpoint", str(empty),
                                                "--prompt", "dog"])


@pytest.mark.slow  # lm-eval indexes its whole task library: ~15 s idle
def test_eval_tasks_unknown_task(checkpoint, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    # Offline already: no "the Hub is unreachable" note before the one error line on a machine
    # without the network (that note is test_first_hour's subject).
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    line = error_line(capsys, ["eval-tasks", "--model_args", f"hf={checkpoint}",
                               "--tasks", "no_such_task_k2jax"])
    assert "no_such_task_k2jax" in line
