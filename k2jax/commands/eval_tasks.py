"""`k2jax eval-tasks`: lm-evaluation-harness benchmarks (MMLU, HellaSwag, GSM8K, ...) on k2jax
weights, on the devices of this host or pod.

A thin wrapper: it adds the model name `k2jax` to lm-eval's registry (lm-eval 0.4 discovers no
plugins, so the stock `lm_eval` command cannot know it) and runs lm-eval's own command line with
every argument after `eval-tasks`; `--model k2jax` is implied. model_args: checkpoint=DIR |
hf=DIR, tokenizer=PATH, dtype=fp32|bf16, logits_dtype, batch_size, max_length,
data/fsdp/tensor (mesh), attention (k2jax/lm_eval/backend.py); checkpoint= may be a run
directory (its latest complete checkpoint).
"""

from __future__ import annotations

import argparse
import sys

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


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's `run` arguments with `--model k2jax` unless a model is named."""
    rest = args[1:] if args and args[0] == "run" else args
    named = any(a == "--model" or a.startswith("--model=") for a in rest)
    return ["run"] + ([] if named else ["--model", "k2jax"]) + rest


def run(args: argparse.Namespace) -> int:
    require("lm_eval", "k2jax eval-tasks")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from k2jax.lm_eval import register

    forwarded = list(args.lm_eval_args)
    if forwarded in ([], ["-h"], ["--help"]):
        HarnessCLI()._subparsers.choices["run"].print_help()
        return 0
    register()
    setup_logging()
    cli = HarnessCLI()
    parsed = cli._parser.parse_args(lm_eval_argv(forwarded))
    try:
        cli.execute(parsed)
    except (ValueError, KeyError) as err:
        message = str(err).strip("'\"").splitlines()[0] if str(err) else type(err).__name__
        if "not found" in message.lower() or "task" in message.lower():
            raise UserError(message) from None
        raise
    sys.stdout.flush()
    return 0
