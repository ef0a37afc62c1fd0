"""`k2jax convert ...`: stream weights between Hugging Face and k2jax Orbax formats
(docs/conversion.md)."""

from __future__ import annotations

import argparse

from k2jax.commands.cli_args import (add_command, add_command_group, add_progress_flags,
                                    dtype_metavar, dtype_type)
from k2jax.storage_errors import writing


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    commands = add_command_group(
        subparsers, "convert", "convert weights: hf-to-orbax, orbax-to-hf",
        "k2jax convert hf-to-orbax --hf K2-ckpt_100 --out weights/ckpt_100 --dtype bf16",
        __doc__, metavar="DIRECTION")

    p = add_command(
        commands, "hf-to-orbax", "Hugging Face LlamaForCausalLM directory -> k2jax weights "
        "directory", "k2jax convert hf-to-orbax --hf K2-ckpt_100 --out weights/ckpt_100 "
        "--dtype bf16",
        description="Read a Hugging Face LlamaForCausalLM directory (sharded or single "
                    "safetensors or PyTorch .bin, with config.json) tensor by tensor and write "
                    "a k2jax weights directory (for train.init_from=DIR and eval).")
    p.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="weights directory to write")
    p.add_argument("--dtype", type=dtype_type(), default=None, metavar=dtype_metavar(),
                   help="stored dtype (unset: bf16 for an all-bf16 source, else fp32)")
    _add_common(p)
    p.set_defaults(func=cmd_hf_to_orbax, flag_words={"force=True": "--force"})

    p = add_command(
        commands, "orbax-to-hf", "k2jax weights or training checkpoint -> Hugging Face "
        "directory", "k2jax convert orbax-to-hf --checkpoint runs/k2/checkpoints/94100 --out "
        "K2-export --dtype bf16 --tokenizer K2-ckpt_100",
        description="Export a k2jax weights directory, or a training checkpoint step directory "
                    "(parameters only), as a Hugging Face LlamaForCausalLM directory.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="weights directory, run_dir/checkpoints/<step>, or run directory (its "
                        "latest complete checkpoint, as in eval-loss and generate)")
    p.add_argument("--out", required=True, metavar="DIR", help="Hugging Face directory to write")
    p.add_argument("--dtype", type=dtype_type(), default="bf16", metavar=dtype_metavar(),
                   help="dtype of the exported tensors")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer to copy into the export: a "
                   "SentencePiece .model file, or a directory with tokenizer files")
    _add_common(p)
    p.set_defaults(func=cmd_orbax_to_hf, flag_words={"shard_size": "--shard-size",
                                                     "force=True": "--force"})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    add_progress_flags(p)


def cmd_hf_to_orbax(args) -> int:
    from k2jax.convert.hf_to_orbax import convert_hf_to_orbax  # keeps `k2jax --help` fast

    with writing(args.out):  # a full disk named by the output, when the OS names no file
        out = convert_hf_to_orbax(args.hf, args.out, dtype=args.dtype, force=args.force,
                                  progress=args.progress)
    print(f"wrote {out}")
    return 0


def cmd_orbax_to_hf(args) -> int:
    from k2jax.convert.orbax_to_hf import convert_orbax_to_hf
    from k2jax.weights import resolve_checkpoint  # a run directory: its latest complete step

    checkpoint = resolve_checkpoint(args.checkpoint)
    with writing(args.out):  # a full disk named by the output, when the OS names no file
        out = convert_orbax_to_hf(checkpoint, args.out, dtype=args.dtype,
                                  shard_size=args.shard_size, tokenizer=args.tokenizer,
                                  force=args.force, progress=args.progress)
    print(f"wrote {out}")
    return 0
