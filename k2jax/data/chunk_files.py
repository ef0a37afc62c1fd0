"""Names and small I/O helpers for K2Datasets chunk files, local or on GCS (via etils.epath).

Layout of a data directory (all optional except the chunks of the form in use):
  chunk_{i}.jsonl                 K2Datasets rows, one JSON object per line
  .k2index/chunk_{i}.offsets.npy  byte offset of every line start, plus the file size (int64)
  .k2index/chunk_{i}.json         manifest: line count, file size, mtime when indexed
  chunk_{i}.tokens.u16            packed rows, uint16 [num_rows, seq_len], row-major
  chunk_{i}.mask.u8               packed tgt_mask, uint8 [num_rows, seq_len] (only if any)
  chunk_{i}.packed.json           packed manifest
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
from etils import epath

from k2jax import files
from k2jax.errors import UserError
from k2jax.storage import is_remote, remote

INDEX_DIRNAME = ".k2index"
_CHUNK_RE = re.compile(r"^chunk_(\d+)\.(jsonl|packed\.json)$")


def jsonl_path(data_dir: epath.Path, chunk_id: int) -> epath.Path:
    return data_dir / f"chunk_{chunk_id}.jsonl"


def default_index_dir(data_dir: epath.Path) -> epath.Path:
    return data_dir / INDEX_DIRNAME


def resolve_index_dir(data_dir: epath.Path, index_dir: Optional[str | os.PathLike]) -> epath.Path:
    """The index directory: explicit (for read-only data dirs) or DATA_DIR/.k2index."""
    return epath.Path(index_dir) if index_dir else default_index_dir(data_dir)


def find_chunk_ids(data_dir: epath.Path, kind: str = "jsonl") -> list[int]:
    """Sorted ids of `chunk_{i}.jsonl` (kind 'jsonl') or packed chunks (kind 'packed')."""
    if not is_remote(data_dir):
        if not data_dir.is_dir():
            raise UserError(f"{data_dir}: not a directory")
        names = [child.name for child in data_dir.iterdir()]
    else:  # listed directly: epath's is_dir() would turn "permission denied" into False
        try:
            names = remote.list_names(data_dir)
        except FileNotFoundError:  # GCS has no directories: no object under the prefix
            raise UserError(f"{data_dir}: not found (no object under this prefix, or no such "
                            "bucket)") from None
    wanted = "jsonl" if kind == "jsonl" else "packed.json"
    ids = []
    for name in names:
        match = _CHUNK_RE.match(name)
        if match and match.group(2) == wanted:
            ids.append(int(match.group(1)))
    return sorted(ids)


def file_signature(path: epath.Path) -> dict[str, int]:
    """What identifies a file's version: size in bytes and modification time (seconds); on
    gs:// also the object's generation (GCS has no inode; mtime has one-second resolution)."""
    if is_remote(path):
        try:
            return remote.signature(path)
        except FileNotFoundError:
            raise UserError(f"{path}: not found") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, expected a file") from None
    try:
        stat = path.stat()
    except (FileNotFoundError, OSError):
        raise UserError(f"{path}: not found")
    if stat.is_directory:  # a directory's size and mtime would pass for a file's
        raise UserError(f"{path}: is a directory, expected a file")
    return {"size": int(stat.length), "mtime": int(stat.mtime)}


REWRITE = "re-run the command that wrote it"


def read_json(path: epath.Path, remedy: str = REWRITE) -> Optional[dict]:
    """Parsed JSON, or None when the file does not exist (k2jax/files.py); `remedy` ends the
    message when it is not a readable JSON file (e.g. "re-run `k2jax data index DIR`")."""
    return files.read_json(path, f"delete it and {remedy}")


def read_npy(path: epath.Path, mmap: bool = True, remedy: str = REWRITE) -> np.ndarray:
    """A .npy array (k2jax/files.py): memory-mapped when local, one line when damaged."""
    return files.read_npy(path, mmap, f"delete it and {remedy}")


