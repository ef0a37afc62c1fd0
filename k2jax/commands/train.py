"""`k2jax train --config FILE [key=value ...]`: the project's main job."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from k2jax.commands.cli_args import PROGRESS_HELP, add_command


def add_parser(subparsers) -> None:
    from k2jax.progress import MODES

    parser = add_command(
        subparsers, "train", "train a K2-architecture model (resumes from run_dir if it has "
        "checkpoints)", "k2jax train --config configs/tiny.yaml train.steps=300 "
        "train.run_dir=runs/tiny", description="Train with the config's recipe (K2's: "
        "--config k2-65b). SIGTERM (a preemption notice) or Ctrl-C: the current step finishes, "
        "is checkpointed, and the run exits 0; before the first step, it exits 0 at once.")
    parser.add_argument("--config", required=True, metavar="FILE|PRESET",
                        help="YAML config (see configs/) or preset name (k2-65b, k2-chat, "
                             "small, tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.steps=100 model.num_layers=2")
    parser.add_argument("--progress", choices=MODES, default="auto",
                        help=PROGRESS_HELP + "; lines: one line per train.log_every steps "
                        "(step, loss, lr, grad norm, tokens/s, MFU, step time, ETA)")
    cluster = parser.add_argument_group("multi-host (not needed on TPU VMs)")
    found = " (default: found by itself on a Cloud TPU VM, else one process)"
    cluster.add_argument("--coordinator-address", help="HOST:PORT of process 0" + found)
    cluster.add_argument("--num-processes", type=int, help="processes in the run" + found)
    cluster.add_argument("--process-id", type=int, help="this process's index" + found)
    parser.set_defaults(func=run, flag_words={
        "coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
        "process_id": "--process-id"})


def check_cluster_args(coordinator_address: Optional[str], num_processes: Optional[int],
                       process_id: Optional[int]) -> None:
    """The three cluster flags go together (all or none), with 0 <= id < processes."""
    from k2jax.errors import UserError

    given = {"--coordinator-address": coordinator_address, "--num-processes": num_processes,
             "--process-id": process_id}
    missing = [flag for flag, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise UserError(f"{', '.join(f for f in given if f not in missing)} given without "
                        f"{', '.join(missing)}: give all three (a multi-process run outside a "
                        f"Cloud TPU VM) or none")
    if missing:
        return
    if num_processes < 1:
        raise UserError(f"--num-processes {num_processes}: expected >= 1")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process-id {process_id}: expected 0 <= id < --num-processes "
                        f"({num_processes})")


def run(args: argparse.Namespace) -> int:
    from k2jax.train.preemption import StoppedBeforeFirstStep, StopRequested

    stop = StopRequested()  # first: a preemption notice may come at any moment of start-up
    try:
        check_cluster_args(args.coordinator_address, args.num_processes, args.process_id)
        from k2jax import distributed
        from k2jax.config import load_config

        # Validated before touching devices; data.per_device_batch_size becomes rows once they
        # are known (the trainer).
        config = load_config(args.config, args.overrides, per_device_batch=True)
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        stop.take_back()  # the cluster client installs a SIGTERM handler of its own
        from k2jax.train.trainer import train

        return train(config, progress=getattr(args, "progress", "auto"), stop=stop)
    except StoppedBeforeFirstStep as stopped:  # nothing trained, so nothing new to save
        # The lock is released and the checkpoint manager closed (the `with`/`finally` blocks
        # on the way here). Exit now: after a compile cut short, XLA's leftovers can crash
        # the interpreter's teardown (SIGSEGV instead of exit 0; k2jax/train/preemption.py).
        print(f"k2jax train: {stopped}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    finally:
        stop.restore()
