"""The `k2jax` command: one subcommand per module, each module owning its own arguments.

A subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` (called with the parsed args, returns an exit code). Adding a command is one line in
SUBCOMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from k2jax import __version__
from k2jax.aot.fast_malloc import restart_with_fast_malloc
from k2jax.commands.cli_args import worded_as_flags
from k2jax.errors import UserError
from k2jax.platform import choose_platform
from k2jax.storage_errors import quiet_background_storage_errors, user_failure

SUBCOMMAND_MODULES = [
    "k2jax.commands.train",
    "k2jax.commands.data",
    "k2jax.commands.aot",
    "k2jax.commands.convert",
    "k2jax.commands.eval_loss",
    "k2jax.commands.compare_hf",
    "k2jax.commands.compare_curves",
    "k2jax.commands.generate",
    "k2jax.commands.eval_tasks",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2jax",
        description="K2-65B pretraining in JAX/Flax: train, data order, conversion, checks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    choose_platform()  # before any command module imports jax
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command_parser = getattr(args, "command_parser", None)
    if unknown:  # argparse would blame the top-level parser: show the subcommand's usage
        (command_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if argv is None and args.command == "aot":  # the process is this compile: a fifth of it
        restart_with_fast_malloc()  # is malloc (k2jax/aot/fast_malloc.py)
    # Errors name the subcommand: "k2jax data prepare-chat: error: ..."
    prog = command_parser.prog if command_parser else f"k2jax {args.command}"
    try:
        # Library errors name parameters; a command lists the flags its user typed for them.
        # When the process is this command, nothing Orbax's threads report after its result
        # or its one line (a recovered restore's leftovers) is printed: the filters that stay
        # until exit go on before the command's come off.
        with quiet_background_storage_errors(until_exit=argv is None) as background, \
                worded_as_flags(getattr(args, "flag_words", {})):
            code = int(args.func(args) or 0)
        if background.first_problem is not None:  # a library logged it and carried on
            raise UserError(background.first_problem)
        return code
    except UserError as err:
        message = f"{prog}: error: {err}"
    except Exception as err:  # a full disk, a directory given as a file: the user's to fix
        problem = user_failure(err)
        if problem is None:
            raise
        message = f"{prog}: error: {problem}"
    print(message, file=sys.stderr, flush=True)
    return 2

if __name__ == "__main__":
    sys.exit(main())
