"""Write a Hugging Face model directory: safetensors shards streamed tensor by tensor, the
index, config.json, generation_config.json and tokenizer files.

The safetensors library writes a file from tensors all held in memory (a 5 GB shard's worth);
the format is simple enough to stream instead: an 8-byte little-endian header length, a JSON
header giving every tensor's dtype, shape and byte range (padded with spaces to a multiple of
8), then the raw C-order bytes in header order. All shapes are known before the first byte,
so the header is written first and each tensor is appended as it is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from etils import epath

from k2jax import dtypes
from k2jax.errors import UserError
from k2jax.storage import is_remote, remote
from k2jax.tokenizer import SENTENCEPIECE_FILE

INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000 (Hugging Face's convention)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for suffix, factor in units.items():
        if upper.endswith(suffix):
            number = upper[: -len(suffix)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise UserError(f"shard_size {text!r}: cannot read (examples: 5GB, 500MB, 2GiB)")
    if size <= 0:
        raise UserError(f"shard_size {text!r}: must be positive")
    return size


def plan_shards(entries: list[ShardEntry], shard_bytes: int) -> list[list[ShardEntry]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow this one (a
    tensor larger than shard_bytes gets a shard of its own), as transformers does."""
    shards: list[list[ShardEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(entries: list[ShardEntry]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": dtypes.from_numpy(entry.dtype).safetensors,
                              "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data 8-byte aligned for memory mapping
    return struct.pack("<Q", len(text)) + text


def write_safetensors_shards(directory: Path, entries: list[ShardEntry], shard_bytes: int,
                             arrays: Iterator[tuple[str, np.ndarray]],
                             on_tensor: Callable[[int], None] = lambda n: None) -> None:
    """Write shards and the index. `arrays` yields (name, array) in `entries` order; each array
    is written before the next is requested, so it may live in a reused buffer."""
    shards = plan_shards(entries, shard_bytes)
    names = shard_names(len(shards))
    weight_map = {}
    for shard, file_name in zip(shards, names):
        with _open_output(directory / file_name) as f:
            f.write(safetensors_header(shard))
            for entry in shard:
                name, array = next(arrays)
                if name != entry.name or array.shape != entry.shape or array.dtype != entry.dtype:
                    raise RuntimeError(f"expected {entry}, got {name} {array.shape} {array.dtype}")
                # bytes via uint8: the buffer protocol has no code for bfloat16
                f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
                weight_map[name] = file_name
                on_tensor(entry.nbytes)
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": weight_map}
    write_json(directory / INDEX_FILE, index)


def _open_output(path):
    """A new file in the output directory: plain open() in the local staging directory (its
    rename publishes it); on gs:// an upload committed only when the block succeeds."""
    return remote.upload(path) if is_remote(path) else open(path, "wb")


def write_json(path, data: dict) -> None:
    with _open_output(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode())


def generation_config(hf_config: dict) -> dict:
    return {"_from_model_config": True,
            **{key: hf_config.get(key) for key in ("bos_token_id", "eos_token_id",
                                                   "pad_token_id")}}


def copy_files(files: Iterable[str], directory) -> None:
    """Copies under the names Hugging Face expects (a lone SentencePiece file as
    tokenizer.model, whatever it was called); either side may be on gs://."""
    for file in files:
        name = SENTENCEPIECE_FILE if os.fspath(file).endswith(".model") else Path(file).name
        if is_remote(directory) or is_remote(file):
            with _open_output(directory / name) as f:
                f.write(epath.Path(file).read_bytes())
        else:
            shutil.copyfile(file, directory / name)
