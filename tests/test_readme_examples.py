"""Every README example runs as written.

README.md's ```bash blocks are split into commands (`\\` continuation lines joined) and each is
classified by ONE table, COMMANDS: a pattern and either Skip(reason) or Run(substitutions,
check). The Run commands execute in README order, through bash, in one scratch directory that
holds `configs/` (a link to the repository's) and the inputs the commands name; later commands
use earlier outputs (the quick start's run, the converted weights, `$ORDER`). `k2jax` on PATH is
`sys.executable -m k2jax.cli` with this tree on PYTHONPATH, so the tree is what runs.

What is substituted, and only that:
- remote data: `hf download` is a local stand-in (`bin/hf`) that writes what the real one would
  fetch: `K2-ckpt_100` = a tiny random LlamaForCausalLM with tiny.yaml's shapes and K2's
  vocabulary, saved by transformers, with a SentencePiece tokenizer trained here; K2Datasets'
  `chunk_{i}.jsonl` = a few K2-format rows. `/data/k2` -> `data/k2` (written here), `k2data` is
  written here too (the eval block precedes the README's download loop), `k2_wandb.csv` is a
  W&B-style export of the curve it is compared with, plus 0.01;
- data scale: K2's steps (150000, 94100) of 2040-row batches -> a small step of a small batch;
  the 65B pod run `runs/k2` -> the quick start's `runs/tiny`.
Skipped: remote services, the 65B/1B configs, multi-host coordinators, interactive editors.
A README command the table does not classify, or a table entry that matches none, fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

# The walk-through (test_readme_command_runs) is slow: it trains 300 + 400 + 50 + 100 tiny
# steps, runs ~30 CLI processes and one AOT compile. The table checks and the argument parsing
# of every command are quick.

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
K2_VOCAB = 32032
K2_ROW = 2048  # data/k2 rows: K2's length, so the data commands run with their defaults
EVAL_ROW = 64  # k2data rows: short, for the model commands (given as --seq-len)
ROWS_PER_CHUNK = 3
NUM_CHUNKS = 360  # k2-stage1 names chunk ids 0..359


# ------------------------------------------------------------------------------------------
# README -> commands


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block, continuation lines joined, comment lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [line.strip() for line in joined.splitlines()
                     if line.strip() and not line.strip().startswith("#")]
    return commands


# ------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class Skip:
    reason: str


@dataclasses.dataclass(frozen=True)
class Run:
    """Run the command with each (README text, replacement) applied; `check(scratch, result)`
    asserts what the README says the command produces."""
    subs: tuple[tuple[str, str], ...] = ()
    check: Optional[Callable] = None
    why: str = ""  # why the substitutions are needed
    before: Optional[Callable] = None  # before(scratch): writes an input an earlier run decides


def small_step(step: str, batch: int, seq: Optional[int] = None) -> tuple[str, str]:
    """K2's step of 2040-row batches -> step 3 of `batch` rows (data scale)."""
    new = step.rsplit(" ", 1)[0] + f" 3 --global-batch {batch}"
    return step, new + (f" --seq-len {seq}" if seq else "")


# Checks -----------------------------------------------------------------------------------

def metrics(scratch: Path) -> list[dict]:
    lines = (scratch / "runs/tiny/metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_quick_start(scratch, result):
    run = scratch / "runs/tiny"
    assert (run / "checkpoints/300").is_dir()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # README: "loss falls from about 10.4 to well under 1". Off a terminal (here) train writes
    # one line per logged step (log_every 10): ln(32032) = 10.37 at step 0, a little less by 10.
    first = re.search(r"step=10/300 loss=([0-9.]+)", result.stderr)
    assert first, result.stderr[-2000:]
    last = {m["step"]: m["loss"] for m in metrics(scratch)}[300]
    assert 9.5 < float(first.group(1)) < 10.5 and last < 1.0, (first.group(1), last)


def check_nothing_to_do(scratch, result):
    assert "nothing to do" in result.stdout + result.stderr
    assert not (scratch / "runs/tiny/checkpoints/400").exists()


def check_resume_200(scratch, result):
    assert (scratch / "runs/tiny/checkpoints/400").is_dir()
    assert "step=210/400 " in result.stderr  # the first step line after the chosen checkpoint
    losses: dict[int, list[float]] = {}
    for m in metrics(scratch):
        losses.setdefault(m["step"], []).append(m["loss"])
    assert max(losses) == 400
    # Steps 210..300 were logged twice (quick start, then this rerun from 200): a resume is
    # bitwise identical to an uninterrupted run (README), so the losses are equal.
    repeated = {s: v for s, v in losses.items() if len(v) > 1}
    assert sorted(repeated) == list(range(210, 301, 10))
    assert all(v[0] == v[1] for v in repeated.values()), repeated
    assert (scratch / "runs/tiny/superseded_checkpoints/300").is_dir()  # kept, out of the way


def check_index(scratch, result):
    assert len(list((scratch / "data/k2/.k2index").glob("chunk_*.offsets.npy"))) == NUM_CHUNKS


def check_pack(scratch, result):
    assert len(list((scratch / "data/k2-packed").glob("chunk_*.tokens.u16"))) == NUM_CHUNKS


def check_locate(scratch, result):
    located = json.loads(result.stdout)
    assert "chunk_" in json.dumps(located)


def check_batch(scratch, result):
    batch = np.load(scratch / "step150000.npy")
    assert batch.dtype == np.int32 and batch.shape == (4, K2_ROW)
    # Step 3 of 4-row batches = global rows 12..15 = chunk 4 (position 4 of k2-stage1), all rows.
    assert batch[0].tolist() == row_tokens(4, 0, K2_ROW)


def check_order(scratch, result):
    order = json.loads(result.stdout)
    assert order[:17] == list(range(16)) + [32] and order[-2:] == [160, 186]


def check_prepare_mine(scratch, result):
    files = sorted((scratch / "data/mine").glob("chunk_*.jsonl"))
    assert len(files) == 16
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert rows and all(len(r["token_ids"]) == 2048 for r in rows)


def check_prepare_k2like(scratch, result):
    assert len(list((scratch / "data/k2like").glob("chunk_*.jsonl"))) == 360


def check_downloaded_model(scratch, result):
    assert (scratch / "K2-ckpt_100/config.json").is_file()
    assert (scratch / "K2-ckpt_100/tokenizer.model").is_file()


def check_generate_text(scratch, result):
    assert result.stdout.startswith("The capital of France is"), result.stdout


def write_prompts(scratch):
    (scratch / "prompts.jsonl").write_text('{"prompt": "Once upon a time"}\n'
                                           '{"prompt": "def main():"}\n')


def check_generate_json(scratch, result):
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Once upon a time", "def main():"]
    for record in records:
        assert 1 <= len(record["token_ids"]) <= 64 and record["prompt_ids"]
        assert record["finish_reason"] in ("eos", "length")


def check_bf16_weights(scratch, result):
    config = json.loads((scratch / "weights/ckpt_100/k2jax_model.json").read_text())
    assert "bfloat16" in json.dumps(config)


def check_fp32_weights(scratch, result):
    config = json.loads((scratch / "weights/ckpt_100-fp32/k2jax_model.json").read_text())
    assert "float32" in json.dumps(config)


def check_export(scratch, result):
    out = scratch / "K2-export"
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json",
                 "tokenizer.model"):
        assert (out / name).is_file(), name
    from transformers import AutoModelForCausalLM  # README: loadable by transformers
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == K2_VOCAB


def eval_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_eval_steps(scratch, result):
    lines = eval_lines(result.stdout)
    assert [r["step"] for r in lines] == [3, 4, 5, 6, 7]
    assert all(np.isfinite(r["loss"]) for r in lines)


def check_eval_bf16(scratch, result):
    assert re.search(r"\b3\b", result.stdout) and "loss" in result.stdout.lower()


def check_eval_run_dir(scratch, result):
    # The run's own synthetic data and config, and its latest complete checkpoint, named.
    assert re.search(r"checkpoint: runs/tiny -> runs/tiny/checkpoints/\d+ \(latest complete",
                     result.stderr), result.stderr
    losses = [float(x) for x in re.findall(r"^step 29[89] .*: loss ([0-9.]+)", result.stdout,
                                           re.M)]
    assert len(losses) == 2 and max(losses) < 1.0, result.stdout  # trained: well under 1


def check_compare_hf(scratch, result):
    assert "PASSED" in result.stdout and "stacks part at" in result.stdout


def check_tiny_eval(scratch, result):
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    losses = [float(re.search(r"loss ([0-9.]+)", line).group(1)) for line in lines]
    assert [line.split()[1] for line in lines] == ["300", "301", "302"], result.stdout
    assert all(loss < 1.0 for loss in losses), losses  # the trained run, on rows it never saw


def check_tokenizer_download(scratch, result):
    assert (scratch / "K2-tokenizer/tokenizer.model").is_file()


def check_tiny_generate(scratch, result):
    assert result.returncode == 0 and result.stdout.startswith("Once upon a time"), result.stdout


def check_tiny_export(scratch, result):
    out = scratch / "exports/tiny-hf"
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    assert list(out.glob("*.safetensors"))


def check_tiny_compare_hf(scratch, result):
    assert "PASSED" in result.stdout, result.stdout


def check_tiny_eval_tasks(scratch, result):
    assert "tiny_qa" in result.stdout and "acc" in result.stdout, result.stdout[-2000:]


def check_tiny_back(scratch, result):
    assert (scratch / "weights/tiny/k2jax_model.json").is_file()


def tiny_metrics(scratch: Path, run: str) -> dict[int, float]:
    lines = (scratch / run / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def check_tiny_continued(scratch, result):
    assert (scratch / "runs/tiny-continued/checkpoints/350").is_dir()
    losses = tiny_metrics(scratch, "runs/tiny-continued")
    assert min(losses) == 310 and losses[310] < 1.0, losses  # on from step 300, not from 10.4


def check_tiny_again(scratch, result):
    assert (scratch / "runs/tiny-again/checkpoints/100").is_dir()


def check_tail_metrics(scratch, result):
    assert [json.loads(line)["step"] for line in result.stdout.splitlines()] == [340, 350]


def check_tiny_curves(scratch, result):
    assert (scratch / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"common steps\s+10\b", result.stdout), result.stdout
    assert re.search(r"mean \|difference\|\s+0\.000000", result.stdout), result.stdout


def check_aot(scratch, result):
    assert "v5e" in result.stdout and "fit" in result.stdout.lower()


def write_chats(scratch: Path) -> None:
    """chats.jsonl: conversations of the common messages format, enough for 4 rows of 8192."""
    rng = random.Random(1)
    lines = [json.dumps({"messages": [
        {"role": "system", "content": text(rng, 5)},
        {"role": "user", "content": text(rng, 200)},
        {"role": "assistant", "content": text(rng, 300)}]}) for _ in range(80)]
    (scratch / "chats.jsonl").write_text("\n".join(lines) + "\n")


def check_prepare_chat(scratch, result):
    out = scratch / "data/chat"
    summary = json.loads((out / "prepare-chat.json").read_text())
    assert summary["conversations"] == 80 and summary["rows"] >= 4
    assert sorted(p.name for p in out.glob("chunk_*.segments.npy")) == [
        f"chunk_{i}.segments.npy" for i in range(4)]
    row = json.loads((out / "chunk_0.jsonl").read_text().splitlines()[0])
    assert len(row["token_ids"]) == 8192 and 0 < sum(row["tgt_mask"]) < 8192
    assert f"wrote 80 conversations as {summary['rows']} rows" in result.stdout


def check_downloaded_chunks(scratch, result):
    assert all((scratch / f"k2data/chunk_{i}.jsonl").is_file() for i in range(101))


def check_reproduce_eval(scratch, result):
    lines = eval_lines((scratch / "ckpt_100.jsonl").read_text())
    assert [r["step"] for r in lines] == [3] and np.isfinite(lines[0]["loss"])


def wandb_export(source: str, iteration_key: str):
    """k2_wandb.csv as W&B exports it (Step, "<run> - lm loss", its MIN/MAX), holding the
    losses of `source` (a metrics.jsonl or eval-loss output) at its iterations, plus 0.01: the
    reference of K2's log agrees with K2's run to about 0.01 (README), so compare-curves passes
    only if it aligns the iterations of both files."""
    def write(scratch: Path) -> None:
        records = eval_lines((scratch / source).read_text())
        lines = ['"Step","k2 - lm loss","k2 - lm loss__MIN","k2 - lm loss__MAX"']
        lines += [f"{r[iteration_key]},{v},{v},{v}" for r in records if "loss" in r
                  for v in [f"{r['loss'] + 0.01:.6f}"]]
        (scratch / "k2_wandb.csv").write_text("\n".join(lines) + "\n")
    return write


def check_curves(png: str, steps: int):
    def check(scratch, result):
        assert (scratch / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert re.search(rf"common steps\s+{steps}\b", result.stdout), result.stdout
        mean = re.search(r"mean \|difference\|\s+([0-9.]+)", result.stdout)
        assert mean and abs(float(mean.group(1)) - 0.01) < 1e-5, result.stdout
    return check


REMOTE = "remote service (needs the network / Google Cloud)"
POD = "K2-65B: needs a TPU pod (the 65B config does not fit a CPU test)"
TINY_RUN = (("runs/k2", "runs/tiny"),)

COMMANDS: list[tuple[str, object]] = [
    # Quick start
    (r"python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \. && k2jax train",
     Run(subs=(("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && ", ""),),
         check=check_quick_start,
         why="installing needs the network; k2jax here is this tree")),
    # After the quick start: the tiny run, end to end
    (r"k2jax eval-loss --checkpoint runs/tiny --config configs/tiny\.yaml --steps 300:303",
     Run(check=check_tiny_eval)),
    (r"hf download LLM360/K2 tokenizer\.model --local-dir K2-tokenizer",
     Run(check=check_tokenizer_download, why="bin/hf: a local stand-in for the Hub")),
    (r"k2jax generate --checkpoint runs/tiny --tokenizer K2-tokenizer/tokenizer\.model",
     Run(check=check_tiny_generate)),
    (r"k2jax convert orbax-to-hf --checkpoint runs/tiny/checkpoints/300 --out exports/tiny-hf",
     Run(check=check_tiny_export)),
    (r"k2jax compare-hf --hf exports/tiny-hf --checkpoint runs/tiny/checkpoints/300",
     Run(check=check_tiny_compare_hf)),
    (r"k2jax eval-tasks --model_args hf=exports/tiny-hf,dtype=fp32 --include_path examples",
     Run(check=check_tiny_eval_tasks)),
    (r"k2jax convert hf-to-orbax --hf exports/tiny-hf --out weights/tiny",
     Run(check=check_tiny_back)),
    (r"k2jax train --config configs/tiny\.yaml train\.init_from=weights/tiny",
     Run(check=check_tiny_continued)),
    (r"k2jax train --config configs/tiny\.yaml train\.steps=100 train\.run_dir=runs/tiny-again",
     Run(check=check_tiny_again)),
    (r"tail -n 2 runs/tiny-continued/metrics\.jsonl", Run(check=check_tail_metrics)),
    (r"k2jax compare-curves --run runs/tiny-again --reference runs/tiny --out curves\.png",
     Run(check=check_tiny_curves)),
    (r"tensorboard --logdir runs", Skip("a long-running server; the event files it reads are "
                                        "those the quick start's check finds")),
    (r"python3 -m venv .* pytest -q -m 'slow or not slow'",
     Skip("the whole test suite, this file included; installs from the network")),
    # k2jax train
    (r"k2jax train --config configs/tiny\.yaml train\.steps=300 train\.run_dir=runs/tiny$",
     Run(check=check_nothing_to_do)),
    (r"k2jax train --config configs/k2-65b\.yaml data\.path=gs://", Skip(POD + "; GCS")),
    (r"k2jax train --config configs/tiny\.yaml train\.resume_step=200 train\.steps=400",
     Run(check=check_resume_200)),
    (r"k2jax train --config configs/small\.yaml train\.init_from=weights/small",
     Skip("configs/small.yaml is 1 B parameters (too big to train in a CPU test) and "
          "weights/small is a user's own conversion")),
    (r"k2jax train --config configs/k2-65b\.yaml train\.init_from=weights/ckpt_100 "
     r"train\.start_step=94100$", Skip(POD)),
    (r"k2jax train .*--coordinator-address 10\.0\.0\.2:1234",
     Skip("multi-host: needs 4 processes and a coordinator at 10.0.0.2 "
          "(tests/test_multihost.py runs 2 processes)")),
    # k2jax data
    (r"k2jax data index --data /data/k2 ",
     Run(subs=(("/data/k2", "data/k2"),), check=check_index, why="/data is not writable here")),
    (r"k2jax data pack --data /data/k2 --out /data/k2-packed",
     Run(subs=(("/data/k2", "data/k2"),), check=check_pack)),
    (r"k2jax data locate --data /data/k2 --step 150000 --global-batch 2040",
     Run(subs=(("/data/k2", "data/k2"), ("--step 150000 --global-batch 2040",
                                         "--step 3 --global-batch 4")),
         check=check_locate, why="data scale")),
    (r"k2jax data batch --data /data/k2 --step 150000 --out step150000\.npy",
     Run(subs=(("/data/k2", "data/k2"), small_step("--step 150000", 4)), check=check_batch,
         why="data scale")),
    (r"k2jax data locate --config configs/k2-chat\.yaml --step 100 data\.path=/data/chat",
     Skip("K2-Chat's data (8192-token rows) is a user's own; the data locate entry above runs "
          "the same code path on K2-format files")),
    (r"k2jax data batch --run-dir runs/k2 ",
     Skip("runs/k2 is a run on K2's data (the pod run); the quick start's run reads synthetic "
          "data, which has no files to batch")),
    (r"k2jax data order --order k2-stage1", Run(check=check_order)),
    (r"k2jax data prepare --tokenizer tokenizer\.model --input docs\.jsonl notes\.txt",
     Run(subs=(("/data/mine", "data/mine"),), check=check_prepare_mine)),
    (r"k2jax data prepare --tokenizer tokenizer\.model --input raw/\*",
     Run(subs=(("/data/k2like", "data/k2like"),), check=check_prepare_k2like)),
    # k2jax convert (and the reproduction's download)
    (r"hf download LLM360/K2 --revision ckpt_100 --local-dir K2-ckpt_100",
     Run(check=check_downloaded_model, why="bin/hf: a local stand-in for the Hub")),
    (r"k2jax convert hf-to-orbax --hf K2-ckpt_100 --out weights/ckpt_100 --dtype bf16 ",
     Run(check=check_bf16_weights)),
    (r"k2jax convert orbax-to-hf --checkpoint runs/k2/checkpoints/94100 --out K2-export",
     Run(subs=(("runs/k2/checkpoints/94100", "runs/tiny/checkpoints/300"),),
         check=check_export, why="the pod run's checkpoint -> the quick start's")),
    # eval-loss, compare-hf, compare-curves
    (r"k2jax eval-loss --hf K2-ckpt_100 --data k2data --steps 94100,94101:94105 --json",
     Run(subs=(("--steps 94100,94101:94105",
                "--steps 3,4:8 --global-batch 4 --seq-len 64"),),
         check=check_eval_steps, why="data scale")),
    (r"k2jax eval-loss --checkpoint weights/ckpt_100 --data k2data --steps 94100 --dtype bf16",
     Run(subs=(small_step("--steps 94100", 4, EVAL_ROW),), check=check_eval_bf16,
         why="data scale")),
    (r"k2jax eval-loss --run-dir runs/tiny --steps 298:300", Run(check=check_eval_run_dir)),
    (r"k2jax convert hf-to-orbax --hf K2-ckpt_100 --out weights/ckpt_100-fp32 --dtype fp32",
     Run(check=check_fp32_weights)),
    (r"k2jax compare-hf --hf K2-ckpt_100 --checkpoint weights/ckpt_100-fp32 --data k2data",
     Run(subs=(small_step("--step 94100", 4, EVAL_ROW),), check=check_compare_hf,
         why="data scale")),
    (r"k2jax compare-curves --run runs/k2 --reference k2_wandb\.csv --steps 94000:95000",
     Run(subs=TINY_RUN + (("94000:95000", "100:300"),), check=check_curves("curves.png", 20),
         before=wandb_export("runs/tiny/metrics.jsonl", "step"),
         why="the pod run -> the quick start's run, and its steps")),
    # k2jax generate, k2jax eval-tasks, Evaluate a checkpoint
    (r"k2jax generate --hf K2-ckpt_100 --prompt ", Run(check=check_generate_text)),
    (r"k2jax generate --checkpoint weights/ckpt_100 --tokenizer K2-ckpt_100 --prompts ",
     Run(before=write_prompts, check=check_generate_json)),
    (r"k2jax eval-tasks --model_args hf=K2-ckpt_100,",
     Skip("HellaSwag's data is on the Hugging Face Hub; tests/test_lm_eval_backend.py runs the "
          "backend on local tasks against lm-eval's hf backend")),
    (r"hf download LLM360/K2 --local-dir K2 ", Skip(REMOTE)),
    (r"k2jax eval-tasks --model_args hf=K2,dtype=bf16,tensor=8 --tasks mmlu",
     Skip("K2-65B on a TPU slice, MMLU from the Hugging Face Hub")),
    # k2jax aot
    (r"k2jax aot --config configs/k2-65b\.yaml --topology v5p-512",
     Skip("K2-65B AOT compile: minutes of CPU and many GB (tests/test_aot.py, slow, plans it)")),
    (r"k2jax aot --config configs/k2-65b\.yaml --topology v5e-256",
     Skip("K2-65B AOT compile: minutes of CPU and many GB (tests/test_aot.py, slow, plans it)")),
    (r"k2jax aot --config configs/tiny\.yaml --topology v5e-4$", Run(check=check_aot)),
    (r"k2jax aot --config configs/examples/llama3\.1-8b-v6e-256\.yaml --topology v6e-256",
     Skip("an 8B AOT compile for 256 chips: minutes of CPU (the calibration's case; "
          "tests/test_maxtext_example.py checks the file is it, tests/test_aot_llama_shapes.py "
          "compiles the same settings at small shapes)")),
    # Reproduce K2's loss at a released checkpoint
    (r"for i in \$\(seq 0 100\); do hf download LLM360/K2Datasets",
     Run(check=check_downloaded_chunks, why="bin/hf: a local stand-in for the Hub")),
    (r"ORDER=\$\(k2jax data order \| python -c", Run()),
    (r"k2jax data index --data k2data --workers 8$", Run()),
    (r"k2jax eval-loss --hf K2-ckpt_100 --data k2data --order \"\$ORDER\" --steps 94100",
     Run(subs=(small_step("--steps 94100", 4, EVAL_ROW),), check=check_reproduce_eval,
         why="data scale")),
    (r"k2jax compare-curves --run ckpt_100\.jsonl --reference k2_wandb\.csv --out ckpt_100\.png",
     Run(check=check_curves("ckpt_100.png", 1),
         before=wandb_export("ckpt_100.jsonl", "iteration"))),
    # Continue K2: stage 2, long context, chat
    (r"hf download LLM360/K2 --revision ckpt_360 ",
     Skip(REMOTE + ": K2-65B's weights; the ckpt_100 download above runs the same stand-in")),
    (r"k2jax convert hf-to-orbax --hf K2-ckpt_360 ",
     Skip("needs the ckpt_360 download; the ckpt_100 conversion above is the same command")),
    (r"k2jax train --config configs/k2-stage2\.yaml",
     Skip(POD + "; tests/test_stage2.py runs steps 338760-338761 of it on a tiny model")),
    (r"k2jax data prepare-chat --tokenizer tokenizer\.model --input chats\.jsonl",
     Run(before=write_chats, check=check_prepare_chat)),
    (r"k2jax train --config configs/k2-chat\.yaml data\.path=data/chat",
     Skip(POD + " at 8192 tokens; tests/test_chat_sft.py and tests/test_long_context.py run "
          "its data path and context on tiny models")),
    (r"k2jax aot --config configs/k2-chat\.yaml --topology v5p-512",
     Skip("K2-65B AOT compile at 8192 tokens: tens of minutes of CPU (docs/performance.md)")),
    (r"k2jax convert orbax-to-hf --checkpoint runs/k2-chat/checkpoints/1000",
     Skip("the K2-Chat pod run's checkpoint; tests/test_long_context.py exports an 8192-token "
          "tiny run and loads it in transformers")),
    # Train K2-65B on a TPU pod
    (r"python -m pip wheel --no-deps -w dist \. && gcloud storage cp", Skip(REMOTE)),
    (r"cp gcp/k2\.env my-run\.env && \$EDITOR", Skip("interactive: opens an editor")),
    (r"gcp/create\.sh && gcp/wait\.sh", Skip(REMOTE + "; tests/test_gcp_scripts.py fakes it")),
    (r"gcp/(setup|launch|logs|stop|delete)\.sh", Skip(REMOTE + "; tests/test_gcp_scripts.py")),
]


def classify(command: str) -> list[tuple[str, object]]:
    return [(pattern, action) for pattern, action in COMMANDS if re.match(pattern, command)]


def test_every_readme_command_is_classified_once():
    unclassified = [c for c in readme_commands(README.read_text()) if len(classify(c)) != 1]
    assert not unclassified, ("README commands with no (or more than one) entry in COMMANDS: "
                              f"{unclassified}")


def test_no_stale_table_entries():
    commands = readme_commands(README.read_text())
    stale = [p for p, _ in COMMANDS if not any(re.match(p, c) for c in commands)]
    assert not stale, f"COMMANDS entries that match no README command: {stale}"


def test_classification_fails_on_a_new_or_removed_command():
    """The two checks above can fail: a command nobody classified, an entry nothing matches."""
    text = README.read_text() + "\n```bash\nk2jax brand-new --thing\n```\n"
    assert any(not classify(c) for c in readme_commands(text))
    without = README.read_text().replace("k2jax data order --order k2-stage1", "")
    assert not any(re.match(r"k2jax data order --order k2-stage1", c)
                   for c in readme_commands(without))


# ------------------------------------------------------------------------------------------
# Inputs


def row_tokens(chunk_id: int, line: int, seq: int) -> list[int]:
    rng = np.random.default_rng([chunk_id, line, seq])
    return rng.integers(0, K2_VOCAB, seq).tolist()


def write_chunk(path: Path, chunk_id: int, seq: int) -> None:
    """A K2-format chunk file (what LLM360/K2Datasets holds), deterministic in its id."""
    rows = [{"token_ids": row_tokens(chunk_id, line, seq), "source": "test", "subset_name": "s",
             "src_filename": "f", "line_idx_in_src": line} for line in range(ROWS_PER_CHUNK)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not (path.is_file() and path.read_text() == text):  # as hf: an identical file stays
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


WORDS = ("the quick brown fox jumps over a lazy dog while data flows through chunk files and "
         "every token finds its step in order").split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def train_tokenizer(directory: Path) -> Path:
    import sentencepiece
    rng = random.Random(0)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([text(rng, 12) for _ in range(400)]),
        model_prefix=str(directory / "spm"), vocab_size=300, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    return directory / "spm.model"


def write_released_model(directory: Path, tokenizer: Path) -> None:
    """What `hf download LLM360/K2 --revision ckpt_100` gives, at tiny.yaml's shapes."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_models import tiny_llama
    model = tiny_llama(vocab_size=K2_VOCAB, hidden_size=64, intermediate_size=176, num_layers=4,
                       num_heads=4, num_kv_heads=4, max_positions=2048, seed=1)
    model.save_pretrained(directory)
    shutil.copy(tokenizer, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True}))


FAKE_HF = '''#!{python}
"""Stand-in for `hf download`: the Hub's files for the two repositories the README names."""
import shutil, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_readme_examples import write_chunk, EVAL_ROW
args = sys.argv[1:]
assert args[0] == "download", args
opt = lambda name: args[args.index(name) + 1]
out = Path(opt("--local-dir"))
if args[1] == "LLM360/K2" and "--revision" not in args:  # one file: K2's tokenizer
    assert args[2] == "tokenizer.model", args
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path({model!r}) / "tokenizer.model", out / "tokenizer.model")
elif args[1] == "LLM360/K2":
    assert opt("--revision") == "ckpt_100"
    if not out.exists():
        shutil.copytree({model!r}, out)
elif args[1] == "LLM360/K2Datasets":
    name = opt("--include")
    write_chunk(out / name, int(name[len("chunk_"):-len(".jsonl")]), EVAL_ROW)
else:
    sys.exit(f"hf stand-in: unknown repository {{args[1]}}")
'''


def make_scratch(scratch: Path) -> dict:
    """configs/, bin/ (k2jax, hf), and every input the commands name; returns the env."""
    (scratch / "configs").symlink_to(REPO / "configs")
    (scratch / "examples").symlink_to(REPO / "examples")
    fixtures = scratch.parent / "fixtures"
    fixtures.mkdir()
    tokenizer = train_tokenizer(fixtures)
    write_released_model(fixtures / "K2-ckpt_100", tokenizer)
    bin_dir = scratch.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "k2jax").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m k2jax.cli "$@"\n')
    (bin_dir / "hf").write_text(FAKE_HF.format(python=sys.executable, model=str(
        fixtures / "K2-ckpt_100"), tests=str(Path(__file__).parent)))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    # data/k2 (README: /data/k2): K2's chunk files; k2data: the same at a short row length,
    # indexed (the eval block precedes the README's download loop and its `data index`).
    for i in range(NUM_CHUNKS):
        write_chunk(scratch / f"data/k2/chunk_{i}.jsonl", i, K2_ROW)
        write_chunk(scratch / f"k2data/chunk_{i}.jsonl", i, EVAL_ROW)
    # data prepare's inputs: the tokenizer, a JSONL of documents, a text file, raw/SUBSET/.
    shutil.copy(tokenizer, scratch / "tokenizer.model")
    rng = random.Random(1)
    (scratch / "docs.jsonl").write_text("".join(
        json.dumps({"text": text(rng, 1500)}) + "\n" for _ in range(8)))
    (scratch / "notes.txt").write_text(text(rng, 3000))
    for subset, key in (("web", "text"), ("starcoder.python", "content")):
        (scratch / "raw" / subset).mkdir(parents=True)
        (scratch / "raw" / subset / "0.jsonl").write_text("".join(
            json.dumps({key: text(rng, 2000)}) + "\n" for _ in range(4)))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env['PATH']}",
               PYTHONPATH=f"{REPO}:{Path(__file__).parent}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("VIRTUAL_ENV", None)
    subprocess.run(["k2jax", "data", "index", "k2data", "--quiet"], cwd=scratch, env=env,
                   check=True, timeout=600)
    return env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    directory = root / "work"
    directory.mkdir()
    return directory, make_scratch(directory)


def runnable() -> list[tuple[int, str, Run]]:
    out = []
    for index, command in enumerate(readme_commands(README.read_text())):
        matches = classify(command)
        if len(matches) == 1 and isinstance(matches[0][1], Run):
            out.append((index, command, matches[0][1]))
    return out


def substituted(command: str, run: Run) -> str:
    for old, new in run.subs:
        assert old in command, f"substitution {old!r} no longer applies to: {command}"
        command = command.replace(old, new)
    return command


# Shell variables a command sets (`ORDER=$(...)`) reach the later commands: each runs with
# `set -a` after sourcing what the previous one exported.
SHELL = """set -a
[ -f .readme_env ] && . ./.readme_env
{command}
status=$?
set +a
export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_)=' > .readme_env
exit $status
"""


@pytest.mark.slow
@pytest.mark.parametrize("index,command,run", runnable(),
                         ids=[f"{i:02d}" for i, _, _ in runnable()])
def test_readme_command_runs(scratch, index, command, run):
    directory, env = scratch
    if run.before:
        run.before(directory)
    result = subprocess.run(["bash", "-c", SHELL.format(command=substituted(command, run))],
                            cwd=directory, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (f"{command}\nexit {result.returncode}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if run.check:
        run.check(directory, result)


@pytest.mark.slow
def test_k2jax_on_path_is_this_tree(scratch):
    directory, env = scratch
    out = subprocess.run(["k2jax", "--version"], cwd=directory, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0
    where = subprocess.run([sys.executable, "-c", "import k2jax; print(k2jax.__file__)"],
                           cwd=directory, env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(REPO / "k2jax"))


def k2jax_argvs(command: str) -> list[list[str]]:
    """The `k2jax ...` invocations in a README command line (pipes, `&&`, `$(...)` split),
    without shell comments."""
    import shlex

    words = shlex.split(command, comments=True)
    argvs, current = [], None
    for word in words:
        if word in ("&&", "|", ";", "||") or word.startswith("$("):
            current = None
            continue
        if word == "k2jax":
            current = []
            argvs.append(current)
        elif current is not None:
            current.append(word)
    return argvs


def test_every_readme_k2jax_command_parses():
    """Quick: each `k2jax` line of README.md passes the CLI's argument parsing (a renamed flag
    or subcommand fails here, without running the walk-through)."""
    from k2jax.cli import build_parser

    parser = build_parser()
    argvs = [argv for command in readme_commands(README.read_text())
             for argv in k2jax_argvs(command)]
    assert len(argvs) > 40
    for argv in argvs:
        args, unknown = parser.parse_known_args(argv)
        assert not unknown and getattr(args, "func", None), argv
