"""The packed form of chunk files: fixed-stride uint16 token rows, memory-mapped.

Per chunk id (ids kept, so every order preset works on packed data too):
  chunk_{i}.tokens.u16   uint16 [num_rows, seq_len] row-major, no header (K2's vocab fits)
  chunk_{i}.mask.u8      uint8  [num_rows, seq_len] tgt_mask; only when some row has one
                         (rows without a tgt_mask get all ones, which means the same)
  chunk_{i}.packed.json  manifest, written last: its presence marks a complete chunk
Row j of the packed chunk is line j of the jsonl chunk, exactly.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from typing import Optional, Sequence

import numpy as np
from etils import epath
from k2jax.progress import Progress, ProgressArg

from k2jax.atomic_write import atomic_file, write_json_atomic
from k2jax.data import chunk_files, stale_temps
from k2jax.data.chunk_index import ChunkIndex
from k2jax.data.jsonl_source import consecutive_runs, parse_row
from k2jax.data.process_local import ProcessLocalHandles
from k2jax.errors import UserError
from k2jax.storage import is_remote, remote
from k2jax.storage_errors import writing

PACKED_VERSION = 1
TOKEN_DTYPE = np.uint16
_ROWS_PER_WRITE = 1024
_DIGEST_SPAN = 64 << 10
_REPACK = "re-run `k2jax data pack`"


def tokens_path(out_dir: epath.Path, chunk_id: int) -> epath.Path:
    return out_dir / f"chunk_{chunk_id}.tokens.u16"


def mask_path(out_dir: epath.Path, chunk_id: int) -> epath.Path:
    return out_dir / f"chunk_{chunk_id}.mask.u8"


def packed_manifest_path(out_dir: epath.Path, chunk_id: int) -> epath.Path:
    return out_dir / f"chunk_{chunk_id}.packed.json"


def source_digest(path: epath.Path) -> str:
    """sha256 of a file's first and last 64 KiB: catches an edit that keeps the size and lands
    within the same mtime second (a rewritten first line), for 128 KiB of reading per file."""
    import hashlib

    digest = hashlib.sha256()
    with remote.open_uncached(path) as f:  # on gs:// two ranged GETs, no read-ahead
        digest.update(f.read(_DIGEST_SPAN))
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - _DIGEST_SPAN, 0))
        digest.update(f.read(_DIGEST_SPAN))
    return digest.hexdigest()


def _source_matches(manifest: dict, source: epath.Path) -> bool:
    """Whether `source` is still the jsonl file the packed chunk was made from."""
    recorded = manifest.get("source", {})
    signature = chunk_files.file_signature(source)
    return (recorded.get("size") == signature["size"] and recorded.get("mtime") ==
            signature["mtime"] and recorded.get("generation") == signature.get("generation")
            and recorded.get("digest") == source_digest(source))


def pack_chunk(data_dir: str, out_dir: str, chunk_id: int, num_lines: int, signature: dict,
               seq_len: int, vocab_size: int, counter=None) -> dict:
    """Rewrite one indexed jsonl chunk into its packed form; returns the manifest."""
    data_dir, out_dir = epath.Path(data_dir), epath.Path(out_dir)
    source = chunk_files.jsonl_path(data_dir, chunk_id)
    any_mask = False
    max_token = -1
    rows = 0
    # Outputs appear whole or not at all: renamed into place locally, committed uploads on GCS.
    with source.open("rb") as src, atomic_file(tokens_path(out_dir, chunk_id), "wb") as tok_out, \
            atomic_file(mask_path(out_dir, chunk_id), "wb") as mask_out:
        tok_buf = np.empty((_ROWS_PER_WRITE, seq_len), TOKEN_DTYPE)
        mask_buf = np.ones((_ROWS_PER_WRITE, seq_len), np.uint8)
        filled = 0
        for line in src:
            rows += 1
            tokens, tgt_mask = parse_row(line, source, rows, seq_len, vocab_size)
            tok_buf[filled] = tokens
            mask_buf[filled] = 1 if tgt_mask is None else tgt_mask
            any_mask = any_mask or tgt_mask is not None
            max_token = max(max_token, int(tokens.max()))
            filled += 1
            if filled == _ROWS_PER_WRITE:
                tok_out.write(tok_buf.tobytes())
                mask_out.write(mask_buf.tobytes())
                filled = 0
                if counter is not None:
                    with counter.get_lock():
                        counter.value += _ROWS_PER_WRITE
        tok_out.write(tok_buf[:filled].tobytes())
        mask_out.write(mask_buf[:filled].tobytes())
        if counter is not None:
            with counter.get_lock():
                counter.value += filled
        if rows != num_lines or chunk_files.file_signature(source) != signature:
            raise UserError(f"{source}: changed since it was indexed; re-run `k2jax data index`")
    if not any_mask:  # all ones means the same as no mask file: drop it (and an older pack's)
        mask_path(out_dir, chunk_id).unlink()
    manifest = {"chunk_id": chunk_id, "num_rows": rows, "seq_len": seq_len,
                "dtype": "uint16", "has_mask": any_mask, "max_token_id": max_token,
                "source": {"file": source.name, **signature, "digest": source_digest(source)},
                "version": PACKED_VERSION}
    write_json_atomic(packed_manifest_path(out_dir, chunk_id), manifest)
    return manifest


_counter = None


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _pack_in_worker(args: tuple) -> dict:
    return pack_chunk(*args, counter=_counter)


def pack_chunks(data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                chunk_ids: Optional[Sequence[int]] = None, *, seq_len: int,
                vocab_size: int, index_dir: Optional[str | os.PathLike] = None,
                workers: int = 1, progress: ProgressArg = True) -> list[dict]:
    """Pack indexed jsonl chunks (all, or `chunk_ids`) into `out_dir`, `workers` at a time.

    A chunk whose packed manifest already records the same source size and mtime is skipped.
    """
    if vocab_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"model.vocab_size={vocab_size} does not fit the packed form's uint16")
    data_dir, out_path = epath.Path(data_dir), epath.Path(out_dir)
    ids = list(chunk_ids) if chunk_ids is not None else chunk_files.find_chunk_ids(data_dir)
    if not ids:
        raise UserError(f"{data_dir}: no chunk_*.jsonl files to pack")
    index = ChunkIndex(data_dir, ids, index_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    jobs, done = [], []
    for chunk_id in index.chunk_ids:
        signature = chunk_files.file_signature(chunk_files.jsonl_path(data_dir, chunk_id))
        old = chunk_files.read_json(packed_manifest_path(out_path, chunk_id), _REPACK)
        source = chunk_files.jsonl_path(data_dir, chunk_id)
        if (old and _source_matches(old, source) and old.get("max_token_id", vocab_size) <
                vocab_size and old.get("seq_len") == seq_len
                and old.get("version") == PACKED_VERSION):
            done.append(old)
            continue
        jobs.append((os.fspath(data_dir), os.fspath(out_path), chunk_id,
                     index.line_counts[chunk_id], signature, seq_len, vocab_size))
    bar = Progress(f"pack {len(jobs)} files", sum(job[3] for job in jobs), unit="row",
                   progress=progress)
    # A killed pack's temporaries go first; a full disk names out_path when the OS names none.
    with stale_temps.writing_into(out_path), writing(out_path), bar:
        if workers <= 1 or len(jobs) <= 1:
            counter = multiprocessing.Value("q", 0, lock=True)
            for job in jobs:
                done.append(pack_chunk(*job, counter=counter))
                bar.update(counter.value - bar.n)
        else:
            # gcsfs is not fork-safe (its event loop thread): gs:// packs spawn their workers.
            on_gcs = is_remote(data_dir) or is_remote(out_path)
            context = multiprocessing.get_context("spawn" if on_gcs else "fork")
            counter = context.Value("q", 0, lock=True)
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=context,
                    initializer=_init_worker, initargs=(counter,)) as pool:
                futures = [pool.submit(_pack_in_worker, job) for job in jobs]
                while not all(f.done() for f in futures):
                    bar.update(counter.value - bar.n)
                    time.sleep(0.2)
                done.extend(f.result() for f in futures)
            bar.update(counter.value - bar.n)
    return done


class PackedChunkReader(ProcessLocalHandles):
    """Reads given rows of packed chunks: tokens int32 [n, S], tgt_mask uint8 [n, S] or None."""

    _handles_attr = "_maps"

    def __init__(self, data_dir: str | os.PathLike, chunk_ids: Sequence[int], seq_len: int,
                 vocab_size: Optional[int] = None, read_mask: bool = True):
        """vocab_size: token ids must be below it (checked against each manifest's recorded
        max_token_id, not by reading the rows); None: no check. read_mask False: mask files are
        neither checked nor opened (data.use_tgt_mask off)."""
        self.data_dir = epath.Path(data_dir)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.read_mask = read_mask
        self.chunk_ids = sorted(set(int(c) for c in chunk_ids))
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            manifests = list(pool.map(self._checked_manifest, self.chunk_ids))
        self.manifests = dict(zip(self.chunk_ids, manifests))
        self.line_counts = {cid: int(m["num_rows"]) for cid, m in self.manifests.items()}
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def _checked_manifest(self, chunk_id: int) -> dict:
        path = packed_manifest_path(self.data_dir, chunk_id)
        manifest = chunk_files.read_json(path, _REPACK)
        if manifest is None:
            raise UserError(f"{path}: packed chunk not found (run `k2jax data pack`)")
        if manifest.get("version") != PACKED_VERSION or manifest.get("seq_len") != self.seq_len:
            raise UserError(f"{path}: packed with seq_len={manifest.get('seq_len')} (version "
                            f"{manifest.get('version')}), expected data.seq_len={self.seq_len}")
        max_token = manifest.get("max_token_id")
        if self.vocab_size is not None and (max_token is None or max_token >= self.vocab_size):
            raise UserError(f"{path}: token ids up to {max_token}, expected below "
                            f"model.vocab_size={self.vocab_size}")
        # A jsonl chunk beside its packed form must still be the one it was packed from: the
        # packed rows would otherwise silently be the old ones.
        source = chunk_files.jsonl_path(self.data_dir, chunk_id)
        if source.exists() and not _source_matches(manifest, source):
            raise UserError(f"{path}: packed from an older {source.name} (size, mtime or "
                            f"content differ); re-run `k2jax data pack`")
        expected = int(manifest["num_rows"]) * self.seq_len
        files = [(tokens_path(self.data_dir, chunk_id), 2 * expected)]
        if manifest["has_mask"] and self.read_mask:
            files.append((mask_path(self.data_dir, chunk_id), expected))
        for file, size in files:
            actual = chunk_files.file_signature(file)["size"]
            if actual != size:
                raise UserError(f"{file}: {actual} bytes, expected {size} from {path}; re-run "
                                f"`k2jax data pack`")
        return manifest

    def _array(self, chunk_id: int, kind: str) -> np.ndarray:
        key = (chunk_id, kind)
        with self._lock:
            if key not in self._maps:
                path, dtype = ((tokens_path(self.data_dir, chunk_id), TOKEN_DTYPE) if kind == "tokens"
                               else (mask_path(self.data_dir, chunk_id), np.uint8))
                self._maps[key] = np.memmap(os.fspath(path), dtype, "r",
                                            shape=(self.line_counts[chunk_id], self.seq_len))
            return self._maps[key]

    def _read_remote(self, path: epath.Path, lines: np.ndarray, dtype) -> np.ndarray:
        out = np.empty((len(lines), self.seq_len), dtype)
        row_bytes = self.seq_len * np.dtype(dtype).itemsize
        for first_index, first_line, count in consecutive_runs(lines):  # one ranged GET a run
            data = remote.read_range(path, first_line * row_bytes, count * row_bytes)
            if len(data) != count * row_bytes:
                raise UserError(f"{path}: shorter than its manifest says; {_REPACK}")
            out[first_index:first_index + count] = np.frombuffer(data, dtype).reshape(
                count, self.seq_len)
        return out

    def read_lines(self, chunk_id: int, lines: np.ndarray
                   ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        lines = np.asarray(lines, np.int64)
        has_mask = self.manifests[chunk_id]["has_mask"] and self.read_mask
        if not is_remote(self.data_dir):
            tokens = self._array(chunk_id, "tokens")[lines].astype(np.int32)
            mask = self._array(chunk_id, "mask")[lines] if has_mask else None
        else:
            tokens = self._read_remote(tokens_path(self.data_dir, chunk_id), lines,
                                       TOKEN_DTYPE).astype(np.int32)
            mask = (self._read_remote(mask_path(self.data_dir, chunk_id), lines, np.uint8)
                    if has_mask else None)
        return tokens, mask
