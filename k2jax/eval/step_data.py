"""The data arguments shared by eval-loss and compare-hf, and the StepLoader they select.

Same meaning as `k2jax data batch`: step t = global rows [start_row + t * B, start_row +
(t + 1) * B) of the chunk files in data.order. The settings come from `--config` (unset: K2's
preset) with key=value overrides; the older flags (--data, --order, --global-batch, ...) are
aliases of their keys (k2jax/commands/cli_args.py).
"""

from __future__ import annotations

import argparse

from k2jax.commands.cli_args import DATA_PATH, STEP_DATA_ALIASES, add_config_args, k2_data_config
from k2jax.config import ModelConfig


def add_data_args(p: argparse.ArgumentParser, aliases=STEP_DATA_ALIASES) -> None:
    add_config_args(p, aliases)


def data_dir(args: argparse.Namespace):
    """--data as given (None when not), e.g. to tell compare-hf's two row sources apart."""
    return getattr(args, DATA_PATH.dest, None)


def step_batches(args: argparse.Namespace, model_config: ModelConfig,
                 aliases=STEP_DATA_ALIASES):
    """StepLoader over the chunk files named by the args (validated, one clear error line)."""
    from k2jax.data.loader import StepLoader

    return StepLoader.from_config(k2_data_config(args, aliases, model=model_config))
