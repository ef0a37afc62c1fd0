"""`k2jax train --config FILE [key=value ...]`: the project's main job."""

from __future__ import annotations

import argparse

from k2jax.commands.cli_args import add_command


def add_parser(subparsers) -> None:
    parser = add_command(
        subparsers, "train", "train a K2-architecture model (resumes from run_dir if it has "
        "checkpoints)", "k2jax train --config configs/tiny.yaml train.steps=300 "
        "train.run_dir=runs/tiny", description="Train with the config's recipe (K2's: "
        "--config k2-65b).")
    parser.add_argument("--config", required=True, metavar="FILE|PRESET",
                        help="YAML config (see configs/) or preset name (k2-65b, k2-chat, "
                             "small, tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.steps=100 model.num_layers=2")
    cluster = parser.add_argument_group("multi-host (not needed on TPU VMs)")
    found = " (default: found by itself on a Cloud TPU VM, else one process)"
    cluster.add_argument("--coordinator-address", help="HOST:PORT of process 0" + found)
    cluster.add_argument("--num-processes", type=int, help="processes in the run" + found)
    cluster.add_argument("--process-id", type=int, help="this process's index" + found)
    parser.set_defaults(func=run, flag_words={
        "coordinator_address": "--coordinator-address", "num_processes": "--num-processes",
        "process_id": "--process-id"})


def run(args: argparse.Namespace) -> int:
    from k2jax import distributed
    from k2jax.config import load_config

    config = load_config(args.config, args.overrides)  # validate before touching devices
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    from k2jax.train.trainer import train

    return train(config)
