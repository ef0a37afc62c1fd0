"""Read a Hugging Face LlamaForCausalLM directory tensor by tensor.

Accepted layouts (the first one present wins):
  model.safetensors.index.json + model-0000X-of-0000Y.safetensors   (K2's main branch)
  model.safetensors
  pytorch_model.bin.index.json + pytorch_model-0000X-of-0000Y.bin   (K2's own converter)
  pytorch_model.bin

`open_hf_checkpoint` reads only headers (safetensors) or memory-maps one shard at a time (.bin),
so every tensor's name, shape and dtype is known before any data is read. `iter_tensors` then
yields the arrays shard by shard, in file order, so reads are sequential and at most one shard
is mapped at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from etils import epath

from k2jax import dtypes
from k2jax.errors import UserError
from k2jax.optional import require
from k2jax.storage import is_remote, remote

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; more means a corrupt length field


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `dtype` is a safetensors code ("BF16"), or the source's own name
    for dtypes conversion does not support (rejected by the checks, with the file named)."""
    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int = -1  # byte offset of the data in a safetensors file; -1 for .bin

    @property
    def nbytes(self) -> int:
        itemsize = dtypes.from_safetensors(self.dtype, self.file).numpy.itemsize
        return math.prod(self.shape) * itemsize


@dataclasses.dataclass
class HFCheckpoint:
    directory: Path
    config: dict  # config.json
    format: str  # "safetensors" or "bin"
    files: list[Path]
    tensors: dict[str, TensorInfo]


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})")
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object (a Hugging Face model config), got "
                        f"{type(config).__name__}")
    return config


def hf_path(directory: str | os.PathLike):
    """pathlib.Path locally; etils.epath for gs:// (a Path would fold `gs://` into `gs:/`)."""
    return epath.Path(str(directory)) if is_remote(directory) else Path(directory)


def open_hf_checkpoint(directory: str) -> HFCheckpoint:
    """Find the weight files and read every tensor's name, shape and dtype (no tensor data).
    `directory` may be on gs:// (safetensors only: headers and tensors come by ranged GETs)."""
    root = hf_path(directory)
    remote.check_listable(directory, "Hugging Face model directory")
    if not root.is_dir():
        raise UserError(f"{directory}: not a directory")
    config = read_config(root)
    fmt, files = _weight_files(root)
    if fmt == "bin" and is_remote(root):
        raise UserError(f"{directory}: PyTorch .bin weights are read from local disk only (torch "
                        "memory-maps them); copy the directory locally first")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        infos = _safetensors_infos(file) if fmt == "safetensors" else _bin_infos(file)
        for info in infos:
            if info.name in tensors:
                raise UserError(f"tensor {info.name} appears in both {tensors[info.name].file} "
                                f"and {file}")
            tensors[info.name] = info
    _check_index(root, fmt, tensors)
    return HFCheckpoint(root, config, fmt, files, tensors)


def _weight_files(root: Path) -> tuple[str, list[Path]]:
    for fmt, index_name, single_name in (("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
                                         ("bin", BIN_INDEX, BIN_SINGLE)):
        index = root / index_name
        if index.is_file():
            weight_map = _read_index(index)
            files = [root / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise UserError(f"{index}: lists shard {file.name}, which does not exist")
            return fmt, files
        if (root / single_name).is_file():
            return fmt, [root / single_name]
    raise UserError(f"{root}: no weights found (expected {SAFETENSORS_INDEX}, "
                    f"{SAFETENSORS_SINGLE}, {BIN_INDEX} or {BIN_SINGLE})")


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index}: not a valid index file (no weight_map: {err})")
    if not isinstance(weight_map, dict):
        raise UserError(f"{index}: weight_map is not a mapping")
    return weight_map


def _check_index(root: Path, fmt: str, tensors: dict[str, TensorInfo]) -> None:
    """The index and the shards must agree: a tensor listed but absent means a bad shard."""
    index = root / (SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX)
    if not index.is_file():
        return
    for name, file_name in _read_index(index).items():
        if name not in tensors:
            raise UserError(f"{index}: lists tensor {name} in {file_name}, but that shard "
                            "does not contain it (truncated or wrong shard?)")
        if tensors[name].file.name != file_name:
            raise UserError(f"{index}: lists tensor {name} in {file_name}, but it is in "
                            f"{tensors[name].file.name}")


def _safetensors_infos(path: Path) -> list[TensorInfo]:
    # The header is JSON after an 8-byte little-endian length; the data offsets it gives let us
    # read each tensor with one sequential readinto, with no mmap and no torch.
    size = (remote.signature(path)["size"] if is_remote(path)
            else path.stat().st_size)
    with remote.open_uncached(path) as f:  # on gs:// two small ranged GETs
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise UserError(f"{path}: corrupt or truncated safetensors file (header length "
                            f"{header_len}, file size {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: corrupt safetensors header ({err})")
    data_start = 8 + header_len
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
            code = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: corrupt safetensors header entry for {name} ({err})")
        if data_start + end > size:
            raise UserError(f"{path}: truncated: tensor {name} needs bytes up to "
                            f"{data_start + end}, the file has {size}")
        info = TensorInfo(name, path, shape, code, data_start + begin)
        if code in {d.safetensors for d in dtypes.TABLE} and info.nbytes != end - begin:
            raise UserError(f"{path}: corrupt: tensor {name} has shape {list(shape)} {code} "
                            f"({info.nbytes} bytes) but {end - begin} bytes of data")
        infos.append(info)
    return sorted(infos, key=lambda i: i.offset)


def _load_bin(path: Path) -> dict:
    torch = require("torch", f"{path}: reading PyTorch .bin shards")  # safetensors do not

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or corrupt zips
        raise UserError(f"{path}: cannot read PyTorch shard, truncated or corrupt "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def _bin_infos(path: Path) -> list[TensorInfo]:
    # mmap=True: loading costs only the zip directory; no tensor data is read.
    state = _load_bin(path)
    return [TensorInfo(name, path, tuple(t.shape), _safetensors_code(t.dtype))
            for name, t in state.items()]


def _safetensors_code(torch_dtype) -> str:
    """torch.bfloat16 -> 'BF16'; a dtype outside the table keeps its own name ('int64'), which
    the checks then reject naming the tensor and file."""
    name = str(torch_dtype).removeprefix("torch.")
    found = dtypes.find(name)
    return found.safetensors if found else name


def iter_tensors(checkpoint: HFCheckpoint, names: Optional[set[str]] = None,
                 read_buffer: np.ndarray | Sequence[np.ndarray] | None = None
                 ) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Yield (info, array) shard by shard, in file order.

    For safetensors the array is a view of `read_buffer` (uint8, at least the largest tensor's
    bytes; reused, so it is only valid until the next item). Given several buffers, tensors
    go into them in turn, so an item stays valid while the next len(buffers) - 1 are read (a
    caller may still be writing it). For .bin it is a view of the memory-mapped shard, which
    is released once the last array of that shard is no longer referenced.
    """
    buffers = [read_buffer] if isinstance(read_buffer, np.ndarray) else list(read_buffer or [])
    turn = itertools.count()
    for file in checkpoint.files:
        infos = [i for i in checkpoint.tensors.values()
                 if i.file == file and (names is None or i.name in names)]
        if checkpoint.format == "safetensors":
            yield from _iter_safetensors(file, sorted(infos, key=lambda i: i.offset), buffers,
                                         turn)
        else:
            yield from _iter_bin(file, infos)


def _iter_safetensors(file: Path, infos: list[TensorInfo], buffers: list[np.ndarray],
                      turn: Iterator[int]):
    with remote.open_uncached(file) as f:  # on gs:// one ranged GET per tensor
        for info in infos:
            dtype = dtypes.from_safetensors(info.dtype, f"tensor {info.name} in {file}").numpy
            buffer = buffers[next(turn) % len(buffers)] if buffers else None
            if buffer is None or buffer.nbytes < info.nbytes:
                buffer = np.empty(info.nbytes, np.uint8)
            raw = buffer[: info.nbytes]
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.nbytes:
                raise UserError(f"{file}: truncated while reading tensor {info.name}")
            yield info, raw.view(dtype).reshape(info.shape)


def _iter_bin(file: Path, infos: list[TensorInfo]):
    state = _load_bin(file)  # says which extra to install when torch is missing
    import torch
    try:
        for info in infos:
            tensor = state[info.name]
            dtype = dtypes.from_safetensors(info.dtype, f"tensor {info.name} in {file}").numpy
            # numpy has no bfloat16: reinterpret the bits through a same-width integer.
            as_int = tensor.view(torch.int16) if dtype.itemsize == 2 else tensor.view(torch.int32)
            yield info, as_int.numpy().view(dtype).reshape(info.shape)
    finally:
        del state  # unmap before the next shard
