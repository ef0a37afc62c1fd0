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


def _add_order_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--step", required=True, type=int)
    p.add_argument("--global-batch", type=int, default=2040)
    p.add_argument("--order", default="k2-stage1", type=_order,
                   help="k2-stage1, k2-stage2, sequential, or comma-separated chunk ids")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "packed"))
    p.add_argument("--start-row", type=int, default=0, help="global row of step 0")
    add_use_tgt_mask_arg(p)
    _add_shape_args(p)
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


def _open(args):
    from k2jax.data.chunked_source import open_chunk_source

    return open_chunk_source(args.data, args.order, args.seq_len, args.vocab_size, args.format,
                             args.index_dir, use_tgt_mask=args.use_tgt_mask)


def _step_rows(args, num_rows: int) -> tuple[int, int]:
    if args.step < 0 or args.global_batch <= 0:
        raise UserError(f"--step must be >= 0 and --global-batch > 0, got {args.step}, "
                        f"{args.global_batch}")
    start = args.start_row + args.step * args.global_batch
    stop = start + args.global_batch
    if stop > num_rows:
        raise UserError(f"step {args.step} needs global rows [{start}, {stop}) but the order "
                        f"holds {num_rows} rows ({num_rows // args.global_batch} whole steps "
                        f"of {args.global_batch})")
    return start, stop


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

    source = _open(args)
    start, stop = _step_rows(args, source.num_rows)
    tokens, _ = source.read_rows(np.arange(start, stop, dtype=np.int64))
    out = epath.Path(args.out)
    chunk_files.write_npy_atomic(out, tokens)
    print(f"wrote step {args.step}: tokens int32 {list(tokens.shape)} (global rows "
          f"[{start}, {stop}), {source.form}) to {out}")
    return 0


def cmd_locate(args) -> int:
    print(json.dumps(locate_step(args), indent=1))
    return 0


def locate_step(args) -> dict:
    """Files and 0-based line ranges that feed step `args.step`, in batch order."""
    from k2jax.data import chunk_files

    source = _open(args)
    start, stop = _step_rows(args, source.num_rows)
    row_map = source.row_map
    positions, lines = row_map.locate(np.arange(start, stop, dtype=np.int64))
    pieces = []
    batch_row = 0
    for position in np.unique(positions):
        selected = lines[positions == position]
        chunk_id = int(row_map.chunk_ids[position])
        pieces.append({
            "order_position": int(position), "chunk_id": chunk_id,
            "file": os.fspath(chunk_files.jsonl_path(epath.Path(args.data), chunk_id)),
            "first_line_0based": int(selected[0]),
            "end_line_0based_exclusive": int(selected[-1]) + 1,
            "num_rows": int(len(selected)), "first_batch_row": batch_row})
        batch_row += len(selected)
    return {"step": args.step, "global_batch_size": args.global_batch,
            "global_rows_start": start, "global_rows_end_exclusive": stop,
            "order": args.order if isinstance(args.order, str) else "explicit",
            "format": source.form, "pieces": pieces}


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
