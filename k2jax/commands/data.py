"""`k2jax data ...`: index, pack, inspect and prepare K2Datasets chunk files (docs/data.md)."""

from __future__ import annotations

import argparse
import json
import sys

from etils import epath

from k2jax.commands.cli_args import (DATA_PATH, INDEX_DIR, SEQ_LEN, STEP_DATA_ALIASES,
                                    VOCAB_SIZE, add_command, add_command_group, add_config_args,
                                    add_progress_flags, add_run_dir_arg, config_dict_from_args,
                                    k2_data_config, step_data_config)
from k2jax.data import fim
from k2jax.data.chunk_assignment import K2_REPEATS_TEXT
from k2jax.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    commands = add_command_group(
        subparsers, "data", "K2 data: index, pack, batch, locate, order, prepare, prepare-chat",
        "k2jax data locate --data /data/k2 --step 150000", __doc__, metavar="DATA_COMMAND")
    _add_index_and_pack(commands)
    _add_step_commands(commands)
    _add_prepare(commands)
    _add_prepare_chat(commands)


def _add_index_and_pack(commands: argparse._SubParsersAction) -> None:
    p = add_command(commands, "index", "write the line-offset index of chunk_*.jsonl files",
                    "k2jax data index --data /data/k2 --workers 8")
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="directory of chunk_{i}.jsonl (local or gs://); or --data DIR")
    p.add_argument("--data", dest="data_flag", metavar="DIR", default=None,
                   help="the same as the positional DIR, as the other commands spell it")
    p.add_argument("--workers", type=int, default=4, help="files indexed in parallel")
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="where the line index lives (unset: DATA/.k2index; for read-only data)")
    add_progress_flags(p)
    p.set_defaults(func=cmd_index)

    p = add_command(commands, "pack", "rewrite indexed chunks as memory-mappable uint16 rows",
                    "k2jax data pack --data /data/k2 --out /data/k2-packed --workers 32")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write the packed chunks to (chunk_{i}.tokens.u16)")
    p.add_argument("--workers", type=int, default=1, help="chunks packed in parallel processes")
    p.add_argument("--chunks", type=_id_list, default=None, metavar="IDS",
                   help="comma-separated chunk ids (unset: all)")
    add_config_args(p, PACK_ALIASES)
    add_progress_flags(p)
    p.set_defaults(func=cmd_pack)


def _add_step_commands(commands: argparse._SubParsersAction) -> None:
    p = add_command(commands, "batch", "write the global batch of a step as int32 [B, S] .npy",
                    "k2jax data batch --data /data/k2 --step 150000 --out step150000.npy")
    _add_order_args(p)
    p.add_argument("--out", required=True, metavar="FILE.npy", help="the .npy file to write")
    p.set_defaults(func=cmd_batch)

    p = add_command(commands, "locate", "print which files and lines feed a step (JSON)",
                    "k2jax data locate --data /data/k2 --step 150000 --order k2-stage1")
    _add_order_args(p)
    p.set_defaults(func=cmd_locate)

    p = add_command(commands, "order", "print the chunk id list of an order preset (JSON)",
                    "k2jax data order --order k2-stage1")
    p.add_argument("--order", default="k2-stage1", type=_order,
                   help="k2-stage1, k2-stage2, sequential, or comma-separated chunk ids")
    p.add_argument("--data", metavar="DIR", help="needed for 'sequential' (the files present)")
    p.set_defaults(func=cmd_order)


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    p = add_command(commands, "prepare", "tokenize text into K2-format chunk_{i}.jsonl files",
                    "k2jax data prepare --tokenizer tokenizer.model --input docs.jsonl "
                    "--out /data/mine --num-chunks 16")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="SentencePiece .model file, or a directory with tokenizer.model")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="a directory = one subset of *.jsonl files (K2's layout); a file = a "
                        "subset named by its stem: .jsonl with a 'text' field per line "
                        "('content' for refinedweb and starcoder*), or plain text (one document)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new directory: chunk_{i}.jsonl and their line index")
    p.add_argument("--num-chunks", type=int, default=1, help="K2: 360")
    p.add_argument("--special-base-id", type=int, default=None,
                   help="id of the first added special token (unset: SentencePiece size)")
    p.add_argument("--source-name", default=None,
                   help="value of each row's 'source' (unset, as K2: the subset name)")
    p.add_argument("--repeat", default=None, metavar="PATTERN=N,...",
                   help="n_repeat per subset (fnmatch, first match wins, else 1; 0 leaves a "
                        "subset out); unset: K2's gather.py table: " + K2_REPEATS_TEXT)
    p.add_argument("--fim-subsets", default=",".join(fim.K2_FIM_SUBSETS), metavar="PATTERN,...",
                   help="subsets that get fill-in-the-middle (K2's; '' for none)")
    p.add_argument("--fim-rate", type=float, default=fim.K2_FIM_RATE,
                   help="chance a code row is written as a FIM copy (K2's)")
    p.add_argument("--fim-spm-rate", type=float, default=fim.K2_SPM_RATE,
                   help="chance a FIM copy is SPM rather than PSM (K2's)")
    p.add_argument("--fim-seed", type=int, default=0,
                   help="seed of the FIM draws (K2's were unseeded: its clock)")
    add_config_args(p, (SEQ_LEN,))
    add_progress_flags(p)
    p.set_defaults(func=cmd_prepare, flag_words={
        "num_chunks": "--num-chunks", "seq_len": "--seq-len", "fim_rate": "--fim-rate",
        "fim_spm_rate": "--fim-spm-rate", "repeat": "--repeat"})


def _add_prepare_chat(commands: argparse._SubParsersAction) -> None:
    p = add_command(commands, "prepare-chat", "chat conversations (jsonl messages) -> packed "
                    "rows with an assistant-only loss mask and document segment ids",
                    "k2jax data prepare-chat --tokenizer tokenizer.model --input chats.jsonl "
                    "--out /data/chat --num-chunks 4")
    p.add_argument("--tokenizer", required=True, metavar="PATH",
                   help="SentencePiece .model file, or a directory with tokenizer.model")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE.jsonl",
                   help='one conversation per line: {"messages": [{"role": "user|assistant|'
                        'system", "content": "..."}, ...]}')
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new directory: chunk_{i}.jsonl (+ tgt_mask), chunk_{i}.segments.npy, "
                        "its line index, prepare-chat.json")
    p.add_argument("--num-chunks", type=int, default=1, help="chunk files the rows are cut into")
    p.add_argument("--special-base-id", type=int, default=None,
                   help="id of the first added special token (unset: SentencePiece size)")
    add_config_args(p, (SEQ_LEN,))
    p.set_defaults(func=cmd_prepare_chat, config=CHAT_PRESET,
                   flag_words={"num_chunks": "--num-chunks", "out_dir": "--out"})
    p._option_string_actions["--config"].help = (
        "YAML config or preset name: data.seq_len, data.chat.* (markers, overlong policy), "
        f"model.vocab_size, model.pad_token_id ({CHAT_PRESET}: K2-Chat's)")
    p._option_string_actions["--seq-len"].help = (  # the default is the chat preset's
        f"tokens per row (= data.seq_len; default: the config's, {CHAT_PRESET}: "
        f"{_preset_seq_len(CHAT_PRESET)})")


def _preset_seq_len(preset: str) -> int:
    from k2jax.config import load_config

    return load_config(preset).data.seq_len


PACK_ALIASES = (DATA_PATH, SEQ_LEN, VOCAB_SIZE, INDEX_DIR)
CHAT_PRESET = "k2-chat"  # prepare-chat's settings: K2-Chat's markers and context
def _add_order_args(p: argparse.ArgumentParser) -> None:
    add_run_dir_arg(p)
    p.add_argument("--step", required=True, type=int,
                   help="0-based step: global rows [step * B, (step + 1) * B) of the order")
    add_config_args(p, (*STEP_DATA_ALIASES, VOCAB_SIZE))


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


def _step_loader(args):
    """The StepLoader over the order the args name: the run's (its config.yaml and moved
    windows), or --config's with the overrides and flags."""
    from k2jax.data.loader import StepLoader

    config, moved = step_data_config(args, (*STEP_DATA_ALIASES, VOCAB_SIZE))
    return StepLoader.from_config(config, moved_row_ranges=moved)


def cmd_index(args) -> int:
    from k2jax.data.chunk_index import ChunkIndex, build_index

    if args.data and args.data_flag and args.data != args.data_flag:
        raise UserError(f"DIR {args.data} and --data {args.data_flag}: give the directory once")
    directory = args.data or args.data_flag
    if directory is None:
        raise UserError("the directory of the chunk files is required: data index --data DIR")
    result = build_index(directory, args.index_dir, workers=args.workers,
                         progress=args.progress)
    ids = sorted(result["indexed"] + result["skipped"])
    index = ChunkIndex(directory, ids, args.index_dir)
    print(f"indexed {len(result['indexed'])} files, skipped {len(result['skipped'])} already "
          f"indexed; {sum(index.line_counts.values())} rows in {len(ids)} files; index in "
          f"{index.index_dir}")
    return 0


def cmd_pack(args) -> int:
    from k2jax.data.packed import pack_chunks

    config = k2_data_config(args, PACK_ALIASES)
    manifests = pack_chunks(config.data.path, args.out, args.chunks,
                            seq_len=config.data.seq_len, vocab_size=config.model.vocab_size,
                            index_dir=config.data.index_dir, workers=args.workers,
                            progress=args.progress)
    rows = sum(m["num_rows"] for m in manifests)
    masked = sum(1 for m in manifests if m["has_mask"])
    print(f"packed {len(manifests)} chunks, {rows} rows ({masked} with tgt_mask) into {args.out}")
    return 0


def cmd_batch(args) -> int:
    from k2jax.atomic_write import write_npy_atomic  # gs://: one direct upload

    loader = _step_loader(args)
    start, stop = loader.logical_rows(args.step)
    tokens = loader.global_batch(args.step)["tokens"]
    out = epath.Path(args.out)
    write_npy_atomic(out, tokens)
    moved = len(loader.moved_row_ranges)
    masked = tgt_mask_rows(loader, args.step)
    applied = "applied" if loader.data.use_tgt_mask else "ignored: data.use_tgt_mask false"
    print(f"wrote step {args.step}: tokens int32 {list(tokens.shape)} (global rows "
          f"[{start}, {stop}) of the order{f' after {moved} moves' if moved else ''}, "
          f"{getattr(loader.source, 'form', loader.data.source)}) to {out}"
          + (f"; {masked} of {len(tokens)} rows carry a tgt_mask that leaves targets out "
             f"({applied})" if masked is not None else ""))
    return 0


def tgt_mask_rows(loader, step: int):
    """How many of `step`'s rows carry a tgt_mask with a 0 among its targets (whether or not
    the run applies it: K2's stage-2 rows may carry one, docs/data.md); None for rows that
    come from no file (synthetic)."""
    import copy

    from k2jax.data.chunked_source import ChunkedRowSource

    source = loader.source
    if not isinstance(source, ChunkedRowSource):
        return None
    reader = copy.copy(source.reader)
    reader.read_mask = True  # masks read even where the run ignores them
    _, loss_mask = ChunkedRowSource(source.row_map, reader, source.seq_len).read_rows(
        loader.global_rows(step))
    return int((loss_mask[:, :-1] == 0).any(axis=1).sum())


def cmd_locate(args) -> int:
    print(json.dumps(locate_step(args), indent=1))
    return 0


def locate_step(args) -> dict:
    """Files and 0-based line ranges that feed step `args.step`, in batch order
    (StepLoader.locate)."""
    loader = _step_loader(args)
    data = loader.data
    start, stop = loader.logical_rows(args.step)
    return {"step": args.step, "global_batch_size": data.global_batch_size,
            "global_rows_start": start, "global_rows_end_exclusive": stop,
            "moved_row_ranges": loader.moved_row_ranges,
            "order": data.order if isinstance(data.order, str) else "explicit",
            "format": getattr(loader.source, "form", data.source),
            "pieces": loader.locate(args.step)}


def cmd_order(args) -> int:
    from k2jax.data import chunk_files
    from k2jax.data.order import resolve_chunk_order

    if args.order == "sequential" and not args.data:
        raise UserError("--order sequential: the chunk files present, in id order; give "
                        "--data DIR to say where they are")
    available = chunk_files.find_chunk_ids(epath.Path(args.data)) if args.data else []
    print(json.dumps(resolve_chunk_order(args.order, available)))
    return 0


def cmd_prepare(args) -> int:
    from k2jax.config import config_from_dict
    from k2jax.data.chunk_assignment import K2_REPEATS, parse_repeats
    from k2jax.data.chunk_index import build_index
    from k2jax.data.prepare import FimOptions, prepare_chunks
    from k2jax.tokenizer import K2Tokenizer

    tokenizer = K2Tokenizer(args.tokenizer, args.special_base_id)
    repeats = K2_REPEATS if args.repeat is None else parse_repeats(args.repeat)
    fim_options = FimOptions(tuple(p for p in args.fim_subsets.split(",") if p.strip()),
                             args.fim_rate, args.fim_spm_rate, args.fim_seed)
    seq_len = config_from_dict(config_dict_from_args(args, (SEQ_LEN,))).data.seq_len
    summary = prepare_chunks(tokenizer, args.input, args.out, args.num_chunks, seq_len,
                             args.source_name, progress=args.progress, repeats=repeats,
                             fim_options=fim_options)
    build_index(args.out, progress=args.progress)  # trainable as written, as prepare-chat
    print(f"wrote {summary['rows']} rows of {seq_len} tokens into {args.num_chunks} "
          f"chunk files in {args.out} (dropped {summary['dropped_tail_tokens']} tail tokens), "
          "indexed", file=sys.stdout)
    empty = summary["rows_per_chunk"].count(0)
    if empty:
        print(f"note: {empty} of the {args.num_chunks} chunk files hold no row (fewer rows than "
              "chunks; --num-chunks decides the files, not how many rows there are)",
              file=sys.stderr)
    return 0


def cmd_prepare_chat(args) -> int:
    from k2jax.config import config_from_dict
    from k2jax.data.chat import chat_tokenizer, prepare_chat
    from k2jax.data.chunk_index import build_index

    config = config_from_dict(config_dict_from_args(args, (SEQ_LEN,)))
    chat, seq_len = config.data.chat, config.data.seq_len
    tokenizer = chat_tokenizer(args.tokenizer, chat, args.special_base_id)
    summary = prepare_chat(tokenizer, args.input, args.out, chat, seq_len,
                           config.model.vocab_size, args.num_chunks,
                           config.model.pad_token_id or 0)
    build_index(args.out, progress=False)  # trainable as written (data.format jsonl)
    print(f"wrote {summary['conversations']} conversations as {summary['rows']} rows of "
          f"{seq_len} tokens into {args.num_chunks} chunk files in {args.out} "
          f"({summary['target_tokens']} target tokens; {summary['dropped_overlong']} dropped "
          f"and {summary['truncated_overlong']} truncated as longer than {seq_len}); "
          f"marker ids {summary['marker_ids']} {summary['marker_ids_from']}")
    return 0
