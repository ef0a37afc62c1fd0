"""`k2jax eval-tasks`: lm-evaluation-harness benchmarks (MMLU, HellaSwag, GSM8K, ...) on k2jax
weights, on the devices of this host or pod.

A thin wrapper: it adds the model name `k2jax` to lm-eval's registry (lm-eval 0.4 discovers no
plugins, so the stock `lm_eval` command cannot know it) and runs lm-eval's own command line with
every argument after `eval-tasks`; `--model k2jax` is implied. `k2jax eval-tasks --help`
shows k2jax's model_args (K2JAX_HELP) before lm-eval's own arguments. Without a reachable Hub,
datasets run offline, so a hub task fails in one line instead of half a minute of retries.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from urllib.parse import urlparse

from k2jax.commands.cli_args import add_command
from k2jax.errors import UserError
from k2jax.optional import require


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(subparsers, "eval-tasks", "lm-evaluation-harness tasks on k2jax weights "
                    "(lm-eval's own arguments)",
                    "k2jax eval-tasks --model_args hf=K2-ckpt_360,dtype=bf16,tensor=4 "
                    "--tasks mmlu --num_fewshot 5 --batch_size 32", description=__doc__,
                    prefix_chars="\0")  # every argument, dashes included, goes to lm-eval
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                   help="lm-eval's arguments, e.g. --tasks mmlu --model_args hf=DIR")
    p.set_defaults(func=run)


K2JAX_HELP = """\
usage: k2jax eval-tasks --model_args hf=DIR|checkpoint=DIR[,KEY=VALUE...] --tasks TASKS
                        [lm-eval's arguments]

Runs lm-evaluation-harness with k2jax as the model (--model k2jax is implied).

k2jax's model_args (comma-separated KEY=VALUE; give hf=DIR or checkpoint=DIR):
  hf=DIR            Hugging Face LlamaForCausalLM directory, converted in memory
  checkpoint=DIR    k2jax weights directory, training checkpoint step (runs/NAME/
                    checkpoints/STEP) or run directory (its latest complete step);
                    needs tokenizer=
  tokenizer=PATH    SentencePiece .model file, or a directory with tokenizer files
                    (default: the hf= directory)
  dtype=fp32|bf16   parameter and compute dtype (default: fp32)
  logits_dtype=fp32|bf16
                    logits rounded to this dtype before the log-softmax (K2: bf16)
  data=N fsdp=N tensor=N
                    mesh axis sizes (default: fsdp over all devices)
  batch_size=N max_length=N max_gen_toks=N attention=auto|xla|pallas|splash|cudnn

Tasks: lm-eval's own (mmlu, hellaswag, ...) download their data from the Hugging Face Hub: they
need the network, or a copy cached by an earlier run (then HF_DATASETS_OFFLINE=1). Your own
tasks with local data: a YAML file per task in a directory, --include_path DIR
(docs/evaluation.md shows one).

examples:
  k2jax eval-tasks --model_args hf=K2,dtype=bf16,tensor=8 --tasks mmlu --num_fewshot 5 \\
      --batch_size 32 --output_path results
  k2jax eval-tasks --model_args checkpoint=runs/tiny/checkpoints/300,tokenizer=tokenizer.model \\
      --include_path my_tasks --tasks my_task

lm-eval's arguments (its `lm_eval run` command):
"""
HUB_HELP = ("its data is on the Hugging Face Hub, which this machine cannot reach: run where "
            "the Hub is reachable (the data is then cached; later runs work offline with "
            "HF_DATASETS_OFFLINE=1), or give a task with local data: --include_path DIR "
            "(docs/evaluation.md)")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT) answers a TCP connect within `timeout` s."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https"
                                                              else 80)), timeout).close()
        return True
    except (OSError, ValueError):
        return False


def go_offline_without_hub() -> None:
    """Without the Hub, datasets and huggingface_hub retry each request for half a minute
    before failing: tell them they are offline (before they are imported: both read it then),
    so a task whose data is not local or cached fails at once."""
    if any(os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return
    if not hub_reachable():
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        print("note: the Hugging Face Hub is unreachable: tasks run offline (local or cached "
              "data only)", file=sys.stderr)


def check_model_args(argv: list[str]) -> None:
    """k2jax's model_args name the weights: refused at once when they do not (lm-eval would
    first index its tasks, then fail inside the model)."""
    def value(flag: str) -> str:
        for i, arg in enumerate(argv):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1:]
        return ""
    if value("--model") != "k2jax":
        return
    from k2jax.lm_eval import LM_EVAL_ARGS, MODEL_ARGS

    keys = {item.split("=", 1)[0].strip() for item in value("--model_args").split(",")}
    if not keys & {"hf", "checkpoint"}:
        raise UserError("--model_args: give hf=DIR or checkpoint=DIR (the weights to evaluate; "
                        "k2jax eval-tasks --help lists the other keys)")
    unknown = sorted(keys - set(MODEL_ARGS) - set(LM_EVAL_ARGS) - {""})
    if unknown:
        raise UserError(f"--model_args: unknown key(s) {', '.join(unknown)} (k2jax's: "
                        f"{', '.join(MODEL_ARGS)}; k2jax eval-tasks --help)")


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's `run` arguments with `--model k2jax` unless a model is named."""
    rest = args[1:] if args and args[0] == "run" else args
    named = any(a == "--model" or a.startswith("--model=") for a in rest)
    return ["run"] + ([] if named else ["--model", "k2jax"]) + rest


def run(args: argparse.Namespace) -> int:
    forwarded = list(args.lm_eval_args)
    if forwarded in ([], ["-h"], ["--help"]):
        require("lm_eval", "k2jax eval-tasks")
        from lm_eval._cli import HarnessCLI

        print(K2JAX_HELP)
        HarnessCLI()._subparsers.choices["run"].print_help()
        return 0
    check_model_args(lm_eval_argv(forwarded))  # before lm-eval spends seconds indexing tasks
    go_offline_without_hub()
    require("lm_eval", "k2jax eval-tasks")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from k2jax.lm_eval import register

    register()
    setup_logging()
    cli = HarnessCLI()
    parsed = cli._parser.parse_args(lm_eval_argv(forwarded))
    try:
        cli.execute(parsed)
    except ConnectionError as err:  # datasets: "Couldn't reach 'Rowan/hellaswag' on the Hub"
        raise UserError(f"{str(err).splitlines()[0]}: {HUB_HELP}") from None
    except (ValueError, KeyError) as err:
        message = str(err).strip("'\"").splitlines()[0] if str(err) else type(err).__name__
        if "not found" in message.lower() or "task" in message.lower():
            raise UserError(message) from None
        raise
    sys.stdout.flush()
    return 0
