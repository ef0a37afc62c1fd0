"""Raw text -> K2Datasets-format chunk files, K2's recipe step by step (docs/data.md).

LLM360/k2-data-prep, whose three passes over files on disk are done here in one pass:

1. `tokenize_datasets.py`, per source file: each document gets `</s>` appended and its words
   (`split(" ")`) go into ONE word buffer that runs across the file's documents; every 4096
   words form a piece (which may cross documents; the rest of the file is one last piece); a
   piece is tokenized with special tokens split out first and no BOS; the file's token stream is
   cut into exact seq_len rows, the short tail dropped.
2. `starcoder_fim_main.py` + `gather.py` (code subsets, `--fim-subsets`): each row also gets its
   two FIM copies (k2jax/data/fim.py); each time the row is written to a chunk, a draw picks the
   plain row or a copy.
3. `gather.py`: rows go to chunks by the running counter and per-subset repeat of
   k2jax/data/chunk_assignment.py, subsets in sorted order, files sorted within a subset.
4. `shuffle.py`: each chunk's rows, in gather order, are shuffled with Python's
   `random.seed(11111 + chunk); random.shuffle(rows)` and written as `chunk_{i}.jsonl` lines
   `{"token_ids", "source", "subset_name", "src_filename", "line_idx_in_src"}` (K2's key order).

Inputs: a directory is one subset (K2's layout: one directory per subset) made of its `*.jsonl`
files; a single file is a subset named by its stem (`.jsonl`: one document per line; any other
file: one document). `src_filename` is K2's path relative to its data roots:
`{subset}/{file}` for a plain row, `{subset}.spm0.0/{file}` or `{subset}.spm1.0/{file}` for a
FIM copy; `line_idx_in_src` is the row's index among its file's rows.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import random
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
from etils import epath
from k2jax.progress import Progress, ProgressArg

from k2jax.atomic_write import atomic_file, no_trace_if_refused, write_json_atomic
from k2jax.data import chunk_files, fim
from k2jax.data.chunk_assignment import K2_REPEATS, ChunkAssigner, cycle_length, repeat_for
from k2jax.errors import UserError
from k2jax.storage import is_remote
from k2jax.tokenizer import EOS_TEXT, K2Tokenizer

WORDS_PER_PIECE = 4096  # tokenize_datasets.py WORD_BUFFER_SIZE
SHUFFLE_SEED_BASE = 11111  # shuffle.py SEED_BASE


@dataclasses.dataclass(frozen=True)
class SourceFile:
    subset: str
    path: epath.Path
    position: int  # index in gather order (subsets sorted, files sorted); seeds FIM per file


def collect_sources(inputs: Sequence[str | os.PathLike]) -> list[SourceFile]:
    """Input paths -> source files in gather.py's order (module docstring)."""
    by_subset: dict[str, dict[str, epath.Path]] = {}
    for item in inputs:
        path = epath.Path(item)
        if path.is_dir():
            subset, files = path.name, sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not files:
                raise UserError(f"{path}: a subset directory needs *.jsonl files; none found")
        elif path.is_file():
            subset, files = path.stem, [path]
        else:
            raise UserError(f"{path}: input file not found")
        named = by_subset.setdefault(subset, {})
        for file in files:
            if file.name in named:
                raise UserError(f"{file}: subset {subset!r} already has a file named {file.name} "
                                f"({named[file.name]})")
            named[file.name] = file
    ordered = []
    for subset in sorted(by_subset):
        ordered += [(subset, by_subset[subset][name]) for name in sorted(by_subset[subset])]
    return [SourceFile(subset, path, i) for i, (subset, path) in enumerate(ordered)]


def text_key(subset: str) -> str:
    """tokenize_datasets.py: 'content' for refinedweb and starcoder subsets, else 'text'."""
    return "content" if subset == "refinedweb" or subset.startswith("starcoder") else "text"


def read_documents(source: SourceFile) -> Iterator[str]:
    """Documents of one source file: `.jsonl` -> each line's text field; else the whole file."""
    path = source.path
    if path.suffix != ".jsonl":
        yield path.read_text()
        return
    key = text_key(source.subset)
    with path.open("r") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines carry no document
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: malformed JSON ({err.msg})") from None
            text = obj.get(key) if isinstance(obj, dict) else None
            if isinstance(text, dict):  # pile-of-law nests the text one level deeper
                text = text.get(key)
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: expected a JSON object with a string {key!r} "
                                f"(subset {source.subset!r})")
            yield text


def word_pieces(documents: Iterator[str], words_per_piece: int = WORDS_PER_PIECE
                ) -> Iterator[str]:
    """K2's word buffer over one file: pieces of `words_per_piece` words joined by single spaces,
    then the rest (possibly empty). split(" ") keeps runs of spaces and newlines inside words."""
    buffer: list[str] = []
    for text in documents:
        buffer.extend((text + EOS_TEXT).split(" "))
        while len(buffer) >= words_per_piece:
            yield " ".join(buffer[:words_per_piece])
            del buffer[:words_per_piece]
    yield " ".join(buffer)


def source_rows(tokenizer: K2Tokenizer, documents: Iterator[str], seq_len: int
                ) -> Iterator[list[int]]:
    """The file's token stream cut into exact seq_len rows; returns the dropped tail length."""
    stream: list[int] = []
    for piece in word_pieces(documents):
        stream.extend(tokenizer.encode(piece))
        whole = len(stream) // seq_len * seq_len
        for start in range(0, whole, seq_len):
            yield stream[start:start + seq_len]
        del stream[:whole]
    return len(stream)


@dataclasses.dataclass(frozen=True)
class FimOptions:
    """Code FIM as K2's gather.py + starcoder_fim_main.py did it; seed replaces K2's clock."""

    subsets: tuple[str, ...] = fim.K2_FIM_SUBSETS  # fnmatch patterns of subset names
    rate: float = fim.K2_FIM_RATE
    spm_rate: float = fim.K2_SPM_RATE
    seed: int = 0

    def applies_to(self, subset: str) -> bool:
        return any(fnmatch.fnmatchcase(subset, p) for p in self.subsets)

    def validate(self) -> None:
        if not (0 <= self.rate <= 1 and 0 <= self.spm_rate <= 1):
            raise UserError(f"fim_rate and fim_spm_rate must lie in [0, 1], got {self.rate} "
                            f"and {self.spm_rate}")


def fim_variant_rng(seed: int, source: SourceFile, variant: int) -> np.random.RandomState:
    """numpy legacy generator of one file's FIM copy `variant` (K2: unseeded global state)."""
    return np.random.RandomState([seed, source.position, variant])


def fim_choice_rng(seed: int, source: SourceFile, chunk: int) -> random.Random:
    """gather.py's per (file, chunk) `random.seed(time.time() + chunk)`, made reproducible."""
    return random.Random(f"{seed}:{source.position}:{chunk}")


class _ChunkSpools:
    """One file per chunk of int32 records [S + 3]: the row's tokens, then its source position,
    variant and line (so a chunk's rows are never all in memory: read back memory-mapped)."""

    def __init__(self, directory: epath.Path, num_chunks: int):
        self.directory = directory
        self.files = [self.path(c).open("wb") for c in range(num_chunks)]

    def path(self, chunk: int) -> epath.Path:
        return self.directory / f"chunk_{chunk}.i32"

    def add(self, chunk: int, row: Sequence[int], position: int, variant: int, line: int) -> None:
        self.files[chunk].write(np.asarray([*row, position, variant, line], np.int32).tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def read(self, chunk: int, seq_len: int) -> np.ndarray:
        """int32 [rows, seq_len + 3]."""
        path = self.path(chunk)
        if not is_remote(path):
            if path.stat().length == 0:
                return np.zeros((0, seq_len + 3), np.int32)
            return np.memmap(os.fspath(path), np.int32, "r").reshape(-1, seq_len + 3)
        return np.frombuffer(path.read_bytes(), np.int32).reshape(-1, seq_len + 3)


def prepare_chunks(tokenizer: K2Tokenizer, inputs: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, num_chunks: int = 1, seq_len: int = 2048,
                   source_name: Optional[str] = None, progress: ProgressArg = True,
                   repeats: tuple[tuple[str, float], ...] = K2_REPEATS,
                   fim_options: FimOptions = FimOptions()) -> dict:
    """Write chunk_{0..num_chunks-1}.jsonl to `out_dir`; returns a summary (also prepare.json).

    `source_name` overrides each row's 'source' (K2: the subset name). `repeats`: (fnmatch
    pattern, n_repeat) pairs, first match wins, default 1 (K2's table by default).
    """
    if num_chunks < 1 or seq_len < 2:
        raise UserError(f"num_chunks must be >= 1 and seq_len >= 2, got {num_chunks}, "
                        f"{seq_len}")
    fim_options.validate()
    sources = collect_sources(inputs)
    cycles = {s.subset: cycle_length(s.subset, repeat_for(s.subset, repeats), num_chunks)
              for s in sources if repeat_for(s.subset, repeats) > 0}
    out = epath.Path(out_dir)
    with no_trace_if_refused(out_dir):  # bad input found while tokenizing: no empty --out
        return _prepare_into(out, tokenizer, sources, cycles, num_chunks, seq_len, source_name,
                             progress, repeats, fim_options)


def _prepare_into(out: epath.Path, tokenizer: K2Tokenizer, sources: list, cycles: dict,
                  num_chunks: int, seq_len: int, source_name: Optional[str], progress: bool,
                  repeats: tuple[tuple[str, float], ...], fim_options: FimOptions) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # Spools are scratch: local beside a local output, a local temporary for gs:// outputs.
    spool_dir = (out / ".prepare-spool" if not is_remote(out)
                 else epath.Path(tempfile.mkdtemp(prefix="k2jax-prepare-spool-")))
    if spool_dir.exists():
        spool_dir.rmtree()
    spool_dir.mkdir()
    spools = _ChunkSpools(spool_dir, num_chunks)
    assigner = ChunkAssigner(num_chunks)
    dropped = 0
    bar = Progress("prepare", sum(s.path.stat().length for s in sources), unit="B",
                   binary=True, progress=progress)
    try:
        for source in sources:
            if source.subset in cycles:  # n_repeat 0: left out, counter untouched
                assigner.start_file(cycles[source.subset])
                dropped += _distribute_file(tokenizer, source, seq_len, assigner, spools,
                                            fim_options)
            bar.update(source.path.stat().length)
        spools.close()
        rows_per_chunk = [_write_chunk(out, spools, chunk, sources, seq_len, source_name)
                          for chunk in range(num_chunks)]
        bar.close()
    except OSError as err:
        if err.filename is None:  # a full disk under a write to an open file: name the output
            err.filename = os.fspath(out)
        raise
    finally:
        bar.close(completed=False)  # after a failure: no "done" line (a no-op after success)
        try:
            spools.close()  # (a no-op after success) after an error, the error told is the first
        except OSError:
            pass
        if spool_dir.exists():
            spool_dir.rmtree()
        for unfinished in out.glob(".chunk_*.jsonl.tmp"):  # none after success (renamed)
            unfinished.unlink()
    summary = {"tokenizer_vocab_size": tokenizer.vocab_size, "seq_len": seq_len,
               "num_chunks": num_chunks, "rows": sum(rows_per_chunk),
               "rows_per_chunk": rows_per_chunk, "dropped_tail_tokens": dropped,
               "inputs": [os.fspath(s.path) for s in sources],
               "subsets": sorted({s.subset for s in sources}),
               "repeats": [list(r) for r in repeats], "fim": dataclasses.asdict(fim_options),
               "shuffle_seed_base": SHUFFLE_SEED_BASE, "words_per_piece": WORDS_PER_PIECE}
    write_json_atomic(out / "prepare.json", summary)
    return summary


def _distribute_file(tokenizer: K2Tokenizer, source: SourceFile, seq_len: int,
                     assigner: ChunkAssigner, spools: _ChunkSpools, options: FimOptions) -> int:
    """Tokenize one file and spool each row to its chunks; returns the dropped tail length."""
    use_fim = options.applies_to(source.subset)
    # K2 computed both FIM copies of every row (each a pass over the whole file), so each
    # copy's generator advances on every row, written or not.
    variant_rngs = {v: fim_variant_rng(options.seed, source, v) for v in (fim.PSM, fim.SPM)}
    choice_rngs: dict[int, random.Random] = {}
    rows = source_rows(tokenizer, read_documents(source), seq_len)
    line = 0
    while True:
        try:
            row = next(rows)
        except StopIteration as stop:
            return stop.value
        variants = {fim.PLAIN: row}
        if use_fim:
            for v, rng in variant_rngs.items():
                variants[v] = fim.fim_row(row, tokenizer, rng, fim.VARIANT_SPM_RATES[v - 1])
        for chunk in assigner.next_row():
            variant = fim.PLAIN
            if use_fim:
                if chunk not in choice_rngs:
                    choice_rngs[chunk] = fim_choice_rng(options.seed, source, chunk)
                variant = fim.choose_variant(choice_rngs[chunk], options.rate, options.spm_rate)
            spools.add(chunk, variants[variant], source.position, variant, line)
        line += 1


def _write_chunk(out: epath.Path, spools: _ChunkSpools, chunk: int,
                 sources: Sequence[SourceFile], seq_len: int,
                 source_name: Optional[str]) -> int:
    records = spools.read(chunk, seq_len)
    order = list(range(len(records)))
    random.Random(SHUFFLE_SEED_BASE + chunk).shuffle(order)  # shuffle.py: same permutation
    target = chunk_files.jsonl_path(out, chunk)
    with atomic_file(target, "wb") as f:  # appears whole or not at all, local or gs://
        for i in order:
            position, variant, line = (int(x) for x in records[i, seq_len:])
            source = sources[position]
            f.write(json.dumps({
                "token_ids": records[i, :seq_len].tolist(), "source": source_name or source.subset,
                "subset_name": source.subset,
                "src_filename": f"{source.subset}{fim.variant_suffix(variant)}/"
                                f"{source.path.name}",
                "line_idx_in_src": line}).encode() + b"\n")
    return len(records)
