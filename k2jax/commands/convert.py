"""`k2jax convert ...`: stream weights between Hugging Face and k2jax Orbax formats
(docs/conversion.md)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert weights: hf-to-orbax, orbax-to-hf",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="convert_command", metavar="DIRECTION")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = commands.add_parser(
        "hf-to-orbax", help="Hugging Face LlamaForCausalLM directory -> k2jax weights directory",
        description="Read a Hugging Face LlamaForCausalLM directory (sharded or single "
                    "safetensors or PyTorch .bin, with config.json) tensor by tensor and write "
                    "a k2jax weights directory (for train.init_from=DIR and eval).")
    p.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="weights directory to write")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="stored dtype (default: bf16 for an all-bf16 source, else fp32)")
    _add_common(p)
    p.set_defaults(func=cmd_hf_to_orbax)

    p = commands.add_parser(
        "orbax-to-hf", help="k2jax weights or training checkpoint -> Hugging Face directory",
        description="Export a k2jax weights directory, or a training checkpoint step directory "
                    "(parameters only), as a Hugging Face LlamaForCausalLM directory.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="weights directory, or run_dir/checkpoints/<step>")
    p.add_argument("--out", required=True, metavar="DIR", help="Hugging Face directory to write")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the exported tensors (default bf16)")
    p.add_argument("--shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--tokenizer", metavar="DIR", help="copy tokenizer files from this directory")
    _add_common(p)
    p.set_defaults(func=cmd_orbax_to_hf)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_hf_to_orbax(args) -> int:
    from k2jax.convert.hf_to_orbax import convert_hf_to_orbax  # keeps `k2jax --help` fast

    out = convert_hf_to_orbax(args.hf, args.out, dtype=args.dtype, force=args.force,
                              progress=not args.no_progress)
    print(f"wrote {out}")
    return 0


def cmd_orbax_to_hf(args) -> int:
    from k2jax.convert.orbax_to_hf import convert_orbax_to_hf

    out = convert_orbax_to_hf(args.checkpoint, args.out, dtype=args.dtype,
                              shard_size=args.shard_size, tokenizer=args.tokenizer,
                              force=args.force, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
