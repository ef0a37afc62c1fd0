"""Preparing raw text into K2Datasets-format chunk files, following K2's recipe (K2_SPEC 2, 4).

Per input file (a source): each document gets the EOS text `</s>` appended; the text is split
on single spaces into pieces of 4096 words; each piece is tokenized (special tokens split out
first, no BOS); the file's token stream is cut into exact seq_len rows and its short tail is
dropped. Rows (numbered across all inputs in input order) go round-robin to chunks
(row r -> chunk r % N); each chunk's rows are shuffled with numpy default_rng(11111 + chunk)
and written as `chunk_{i}.jsonl` with token_ids, source, subset_name, src_filename and
line_idx_in_src (the row's index among the rows cut from its source file).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np
from etils import epath
from tqdm import tqdm

from k2jax.data import chunk_files
from k2jax.errors import UserError
from k2jax.tokenizer import EOS_TEXT, K2Tokenizer

WORDS_PER_PIECE = 4096
SHUFFLE_SEED_BASE = 11111


def read_documents(path: epath.Path) -> Iterator[str]:
    """Documents of one input: `.jsonl` -> each line's 'text'; any other file -> one document."""
    if path.suffix != ".jsonl":
        yield path.read_text()
        return
    with path.open("r") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines carry no document
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{number}: expected a JSON object with a string 'text'")
            yield obj["text"]


def tokenize_document(tokenizer: K2Tokenizer, text: str,
                      words_per_piece: int = WORDS_PER_PIECE) -> list[int]:
    """K2's tokenization of one document: `text + '</s>'` in 4096-word pieces, no BOS."""
    # split(" ") (not split()) keeps runs of spaces and newlines, so pieces rejoin exactly.
    words = (text + EOS_TEXT).split(" ")
    ids: list[int] = []
    for start in range(0, len(words), words_per_piece):
        ids.extend(tokenizer.encode(" ".join(words[start:start + words_per_piece])))
    return ids


def prepare_chunks(tokenizer: K2Tokenizer, inputs: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, num_chunks: int = 1, seq_len: int = 2048,
                   source_name: str = "custom", progress: bool = True) -> dict:
    """Write chunk_{0..num_chunks-1}.jsonl to `out_dir`; returns a summary (also prepare.json)."""
    if num_chunks < 1 or seq_len < 2:
        raise UserError(f"--num-chunks must be >= 1 and --seq-len >= 2, got {num_chunks}, "
                        f"{seq_len}")
    paths = [epath.Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: input file not found")
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spool_dir = out / ".prepare-spool"
    if spool_dir.exists():
        spool_dir.rmtree()
    spool_dir.mkdir()
    spools = [(spool_dir / f"chunk_{c}.i32").open("wb") for c in range(num_chunks)]
    metadata: list[list[tuple[int, int]]] = [[] for _ in range(num_chunks)]  # (input, row)
    row_count, dropped = 0, 0
    bar = tqdm(total=sum(p.stat().length for p in paths), unit="B", unit_scale=True,
               desc="prepare", disable=not progress)
    try:
        for input_number, path in enumerate(paths):
            stream: list[int] = []
            rows_in_source = 0
            for text in read_documents(path):
                stream.extend(tokenize_document(tokenizer, text))
                # Cut complete rows as they appear, so memory stays at about one row.
                whole = len(stream) // seq_len * seq_len
                for start in range(0, whole, seq_len):
                    chunk = row_count % num_chunks
                    spools[chunk].write(np.asarray(stream[start:start + seq_len], np.int32)
                                        .tobytes())
                    metadata[chunk].append((input_number, rows_in_source))
                    row_count += 1
                    rows_in_source += 1
                del stream[:whole]
            dropped += len(stream)
            bar.update(path.stat().length)
        for f in spools:
            f.close()
        rows_per_chunk = []
        for chunk in range(num_chunks):
            rows_per_chunk.append(_write_chunk(out, spool_dir, chunk, metadata[chunk], paths,
                                               seq_len, source_name))
    finally:
        bar.close()
        for f in spools:
            f.close()
        if spool_dir.exists():
            spool_dir.rmtree()
    summary = {"tokenizer_vocab_size": tokenizer.vocab_size, "seq_len": seq_len,
               "num_chunks": num_chunks, "rows": row_count, "rows_per_chunk": rows_per_chunk,
               "dropped_tail_tokens": dropped, "inputs": [os.fspath(p) for p in paths],
               "shuffle_seed_base": SHUFFLE_SEED_BASE, "words_per_piece": WORDS_PER_PIECE}
    chunk_files.write_json_atomic(out / "prepare.json", summary)
    return summary


def _write_chunk(out: epath.Path, spool_dir: epath.Path, chunk: int,
                 metadata: list[tuple[int, int]], paths: Sequence[epath.Path], seq_len: int,
                 source_name: str) -> int:
    data = (spool_dir / f"chunk_{chunk}.i32").read_bytes()
    rows = np.frombuffer(data, np.int32).reshape(-1, seq_len)
    order = np.random.default_rng(SHUFFLE_SEED_BASE + chunk).permutation(len(rows))
    target = chunk_files.jsonl_path(out, chunk)
    tmp = out / f".{target.name}.tmp"
    with tmp.open("w") as f:
        for i in order:
            input_number, row_in_source = metadata[i]
            f.write(json.dumps({
                "token_ids": rows[i].tolist(), "source": source_name,
                "subset_name": paths[input_number].stem,
                "src_filename": paths[input_number].name,
                "line_idx_in_src": row_in_source}) + "\n")
    tmp.replace(target)
    return len(rows)

