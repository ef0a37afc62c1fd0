"""`k2jax data ...`: index, pack, inspect and prepare K2Datasets chunk files (docs/data.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from etils import epath

from k2jax.data import fim
from k2jax.data.chunk_assignment import K2_REPEATS_TEXT
from k2jax.errors import UserError
from k2jax.eval.step_data import add_use_tgt_mask_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="K2 data: index, pack, batch, locate, order, prepare",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    p = commands.add_parser("index", help="write the line-offset index of chunk_*.jsonl files")
    p.add_argument("data", metavar="DIR", help="directory of chunk_{i}.jsonl (local or gs://)")
    p.add_argument("--workers", type=int, default=4, help="files indexed in parallel")
    _add_index_dir(p)
    _add_quiet(p)
    p.set_defaults(func=cmd_index)

    p = commands.add_parser("pack", help="rewrite indexed chunks as memory-mappable uint16 rows")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR2")
    p.add_argument("--workers", type=int, default=1, help="chunks packed in parallel processes")
    p.add_argument("--chunks", type=_id_list, default=None, metavar="IDS",
                   help="comma-separated chunk ids (default: all)")
    _add_shape_args(p)
    _add_index_dir(p)
    _add_quiet(p)
    p.set_defaults(func=cmd_pack)

    p = commands.add_parser("batch", help="write the global batch of a step as int32 [B, S] .npy")
    _add_order_args(p)
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.set_defaults(func=cmd_batch)

    p = commands.add_parser("locate", help="print which files and lines feed a step (JSON)")
    _add_order_args(p)
    p.set_defaults(func=cmd_locate)

    p = commands.add_parser("order", help="print the chunk id list of an order preset (JSON)")
    p.add_argument("--order", default="k2-stage1", type=_order)
    p.add_argument("--data", metavar="DIR", help="needed for 'sequential' (the files present)")
    p.set_defaults(func=cmd_order)

    p = commands.add_parser("prepare", help="tokenize text into K2-format chunk_{i}.jsonl files")
    p.add_argument("--tokenizer", required=True, metavar="SPM.model")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="a directory = one subset of *.jsonl files (K2's layout); a file = a "
                        "subset named by its stem: .jsonl with a 'text' field per line "
                        "('content' for refinedweb and starcoder*), or plain text (one document)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--num-chunks", type=int, default=1, help="K2: 360")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--special-base-id", type=int, default=None,
                   help="id of the first added special token (default: SentencePiece size)")
    p.add_argument("--source-name", default=None,
                   help="value of each row's 'source' (default, as K2: the subset name)")
    p.add_argument("--repeat", default=None, metavar="PATTERN=N,...",
                   help="n_repeat per subset (fnmatch, first match wins, else 1; 0 leaves a "
                        "subset out); default K2's gather.py table: " + K2_REPEATS_TEXT)
    p.add_argument("--fim-subsets", default=",".join(fim.K2_FIM_SUBSETS), metavar="PATTERN,...",
                   help="subsets that get fill-in-the-middle (K2: %(default)s; '' for none)")
    p.add_argument("--fim-rate", type=float, default=fim.K2_FIM_RATE,
                   help="chance a code row is written as a FIM copy (K2: %(default)s)")
    p.add_argument("--fim-spm-rate", type=float, default=fim.K2_SPM_RATE,
                   help="chance a FIM copy is SPM rather than PSM (K2: %(default)s)")
    p.add_argument("--fim-seed", type=int, default=0,
                   help="seed of the FIM draws (K2's were unseeded: its clock)")
    _add_quiet(p)
    p.set_defaults(func=cmd_prepare)


def _add_index_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="where the line index lives (default DATA/.k2index; for read-only data)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32032, help="token ids must be below this")


# The order settings and their defaults without --run-dir; with it the run's config sets them.
ORDER_DEFAULTS = {"global_batch": 2040, "order": "k2-stage1", "start_row": 0, "seq_len": 2048,
                  "vocab_size": 32032}


def _add_order_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR",
                   help="directory of the chunk files (with --run-dir: default the run's "
                        "data.path)")
    p.add_argument("--run-dir", metavar="RUN",
                   help="follow this training run's order: its config.yaml and the rows its "
                        "rollbacks moved (data_order.json)")
    p.add_argument("--step", required=True, type=int)
    p.add_argument("--global-batch", type=int, help="default 2040")
    p.add_argument("--order", type=_order,
                   help="k2-stage1 (default), k2-stage2, sequential, or comma-separated chunk ids")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "packed"))
    p.add_argument("--start-row", type=int, help="global row of step 0 (default 0)")
    p.add_argument("--seq-len", type=int, help="default 2048")
    p.add_argument("--vocab-size", type=int, help="token ids must be below this (default 32032)")
    add_use_tgt_mask_arg(p)  # with --run-dir the run's data.use_tgt_mask decides
    _add_index_dir(p)


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated chunk ids, got {text!r}")
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected chunk ids >= 0, got {text!r}")
    return ids


def _order(text: str):
    return _id_list(text) if text[:1].isdigit() else text


def _order_config(args):
    """The Config whose data order the command follows: the run's, or one from the flags."""
    from k2jax.config import Config, DataConfig, ModelConfig
    from k2jax.data.run_order import load_run_config
    from k2jax.paths import storage_path

    if args.run_dir is None:
        if args.data is None:
            raise UserError("--data DIR is required (or --run-dir RUN)")
        given = {k: getattr(args, k) if getattr(args, k) is not None else default
                 for k, default in ORDER_DEFAULTS.items()}
        if given["global_batch"] <= 0:
            raise UserError(f"--global-batch must be positive, got {given['global_batch']}")
        data = DataConfig(source="k2", path=args.data, order=given["order"], format=args.format,
                          index_dir=args.index_dir, seq_len=given["seq_len"],
                          global_batch_size=given["global_batch"],
                          micro_batch_size=given["global_batch"], start_row=given["start_row"],
                          use_tgt_mask=args.use_tgt_mask)
        return Config(model=ModelConfig(vocab_size=given["vocab_size"]), data=data)
    fixed = [f"--{k.replace('_', '-')}" for k in ORDER_DEFAULTS if getattr(args, k) is not None]
    if fixed:
        raise UserError(f"{', '.join(fixed)}: set by the run's config with --run-dir "
                        f"{args.run_dir}; give only --data, --format, --index-dir")
    config = load_run_config(storage_path(args.run_dir))
    if args.data is not None:  # where the same chunk files live on this machine
        config.data.path = args.data
    if args.format != "auto" or args.index_dir is not None:
        config.data.format, config.data.index_dir = args.format, args.index_dir
    return config


def _step_batches(args):
    """StepBatches over the order the args name: the single map from a step to its rows."""
    from k2jax.data.pipeline import make_step_batches

    return make_step_batches(_order_config(args))


def cmd_index(args) -> int:
    from k2jax.data.chunk_index import ChunkIndex, build_index

    result = build_index(args.data, args.index_dir, workers=args.workers,
                         progress=not args.quiet)
    ids = sorted(result["indexed"] + result["skipped"])
    index = ChunkIndex(args.data, ids, args.index_dir)
    print(f"indexed {len(result['indexed'])} files, skipped {len(result['skipped'])} already "
          f"indexed; {sum(index.line_counts.values())} rows in {len(ids)} files; index in "
          f"{index.index_dir}")
    return 0


def cmd_pack(args) -> int:
    from k2jax.data.packed import pack_chunks

    manifests = pack_chunks(args.data, args.out, args.chunks, args.seq_len, args.vocab_size,
                            args.index_dir, args.workers, progress=not args.quiet)
    rows = sum(m["num_rows"] for m in manifests)
    masked = sum(1 for m in manifests if m["has_mask"])
    print(f"packed {len(manifests)} chunks, {rows} rows ({masked} with tgt_mask) into {args.out}")
    return 0


def cmd_batch(args) -> int:
    from k2jax.data import chunk_files

    batches = _step_batches(args)
    start, stop = batches.logical_rows(args.step)
    tokens = batches.global_batch(args.step)["tokens"]
    out = epath.Path(args.out)
    chunk_files.write_npy_atomic(out, tokens)
    moved = len(batches.data.moved_row_ranges)
    print(f"wrote step {args.step}: tokens int32 {list(tokens.shape)} (global rows "
          f"[{start}, {stop}) of the order{f' after {moved} moves' if moved else ''}, "
          f"{getattr(batches.source, 'form', batches.data.source)}) to {out}")
    return 0


def cmd_locate(args) -> int:
    print(json.dumps(locate_step(args), indent=1))
    return 0


def locate_step(args) -> dict:
    """Files and 0-based line ranges that feed step `args.step`, in batch order: one piece per
    run of consecutive original rows (a rollback's move can split a step into several)."""
    from k2jax.data import chunk_files

    batches = _step_batches(args)
    data = batches.data
    start, stop = batches.logical_rows(args.step)
    rows = batches.global_rows(args.step)
    row_map = getattr(batches.source, "row_map", None)  # None: synthetic rows, no files
    positions = row_map.locate(rows)[0] if row_map is not None else np.zeros_like(rows)
    cuts = np.flatnonzero((np.diff(rows) != 1) | (np.diff(positions) != 0)) + 1
    bounds = [0, *cuts.tolist(), len(rows)]
    pieces = []
    for first, end in zip(bounds[:-1], bounds[1:]):
        row, position = int(rows[first]), int(positions[first])
        piece = {"first_original_row": row, "num_rows": end - first, "first_batch_row": first}
        if row_map is not None:
            chunk_id = int(row_map.chunk_ids[position])
            line = row - int(row_map.starts[position])
            piece = {"order_position": position, "chunk_id": chunk_id,
                     "file": os.fspath(chunk_files.jsonl_path(epath.Path(data.path), chunk_id)),
                     "first_line_0based": line, "end_line_0based_exclusive": line + end - first,
                     **piece}
        pieces.append(piece)
    return {"step": args.step, "global_batch_size": data.global_batch_size,
            "global_rows_start": start, "global_rows_end_exclusive": stop,
            "moved_row_ranges": data.moved_row_ranges,
            "order": data.order if isinstance(data.order, str) else "explicit",
            "format": getattr(batches.source, "form", data.source), "pieces": pieces}


def cmd_order(args) -> int:
    from k2jax.data import chunk_files
    from k2jax.data.order import resolve_chunk_order

    available = chunk_files.find_chunk_ids(epath.Path(args.data)) if args.data else []
    print(json.dumps(resolve_chunk_order(args.order, available)))
    return 0


def cmd_prepare(args) -> int:
    from k2jax.data.chunk_assignment import K2_REPEATS, parse_repeats
    from k2jax.data.prepare import FimOptions, prepare_chunks
    from k2jax.tokenizer import K2Tokenizer

    tokenizer = K2Tokenizer(args.tokenizer, args.special_base_id)
    repeats = K2_REPEATS if args.repeat is None else parse_repeats(args.repeat)
    fim_options = FimOptions(tuple(p for p in args.fim_subsets.split(",") if p.strip()),
                             args.fim_rate, args.fim_spm_rate, args.fim_seed)
    summary = prepare_chunks(tokenizer, args.input, args.out, args.num_chunks, args.seq_len,
                             args.source_name, progress=not args.quiet, repeats=repeats,
                             fim_options=fim_options)
    print(f"wrote {summary['rows']} rows of {args.seq_len} tokens into {args.num_chunks} "
          f"chunk files in {args.out} (dropped {summary['dropped_tail_tokens']} tail tokens)",
          file=sys.stdout)
    return 0
