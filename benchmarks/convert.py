"""Conversion throughput and peak memory on a synthetic K2-width checkpoint.

Builds a bf16 Hugging Face checkpoint with K2's widths (configs/k2-65b.yaml: hidden,
intermediate, vocab, heads) and a few layers in a temporary directory, converts it both ways with
`k2jax convert` (each direction in its own subprocess, so its peak RSS is its own), checks the
round trip is bit-exact, and prints a table against two baselines on the same input files:
  plain read  sequential read of every input file (what the issue's >= 0.5x target is about);
  plain copy  read + write of the same bytes to the same disk (shutil.copyfile per file,
              fsynced like the converter's output): the realistic ceiling for a converter.
--cold evicts the input files from the page cache (posix_fadvise DONTNEED) before each
measured step, so reads come from the disk. Writes nothing into the repository.

    JAX_PLATFORMS=cpu python benchmarks/convert.py [--layers 2] [--repeat 2] [--cold] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import io_floor  # benchmarks/io_floor.py, next to this script
from k2jax.config import K2_PRESET, ModelConfig, load_config
from k2jax.convert.expected import expected_tensors
from k2jax.convert.hf_writer import ShardEntry, write_safetensors_shards
from k2jax import dtypes
from k2jax.hf.config_json import hf_config_dict

GB = 1e9
BF16 = dtypes.BFLOAT16.numpy


def build_checkpoint(directory: Path, config: ModelConfig) -> tuple[int, int]:
    """Random bf16 tensors in K2's HF layout, 2 GB shards. Returns (total, largest) bytes."""
    directory.mkdir(parents=True)
    expected = expected_tensors(config)
    entries = [ShardEntry(name, e.hf_shape, BF16) for name, e in expected.items()]
    rng = np.random.default_rng(0)
    block = rng.integers(0, 2**16, size=2**25, dtype=np.uint16)  # 64 MiB of random bits

    def arrays():
        for i, entry in enumerate(entries):
            n = int(np.prod(entry.shape))
            # A rolled random block: every tensor differs, and it is fast to make.
            data = np.resize(np.roll(block, i * 7919), n).view(BF16).reshape(entry.shape)
            yield entry.name, data

    write_safetensors_shards(directory, entries, 2 * 10**9, arrays())
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config)))
    return sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (written back first), for cold reads."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read_seconds(files: list[Path], cold: bool) -> float:
    """Sequential read of every file through one reused 64 MiB buffer (the I/O floor)."""
    if cold:
        evict(files)
    return io_floor.plain_read_seconds(files)


def plain_copy_seconds(files: list[Path], scratch: Path, cold: bool) -> float:
    """Copy every file to `scratch` (same disk) and fsync the copies, as the converter fsyncs
    its output: the time any converter needs just to move the bytes."""
    if cold:
        evict(files)
    scratch.mkdir()
    start = time.perf_counter()
    for i, file in enumerate(files):
        copy = scratch / f"{i}-{file.name}"
        shutil.copyfile(file, copy)
        fd = os.open(copy, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return seconds


def run_child(argv: list[str]) -> tuple[float, int]:
    """Run `python -m k2jax.cli argv` and return (seconds, peak RSS bytes of that child)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "k2jax.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"k2jax {' '.join(argv)} failed with exit {proc.returncode}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def compare_bits(a: Path, b: Path) -> int:
    """Number of tensors compared (raises on any difference)."""
    from k2jax.convert.hf_reader import iter_tensors, open_hf_checkpoint

    left, right = open_hf_checkpoint(str(a)), open_hf_checkpoint(str(b))
    assert sorted(left.tensors) == sorted(right.tensors)
    theirs = {info.name: array.copy() for info, array in iter_tensors(right)}
    for info, array in iter_tensors(left):
        if not np.array_equal(array.view(np.uint16), theirs.pop(info.name).view(np.uint16)):
            raise SystemExit(f"round trip differs in {info.name}")
    return len(left.tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="measure everything N times")
    parser.add_argument("--cold", action="store_true",
                        help="evict the input files from the page cache before each step")
    parser.add_argument("--dir", default=None, help="work directory (default: a new /tmp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    config = load_config(K2_PRESET, [f"model.num_layers={args.layers}"]).model  # K2's widths
    work = Path(args.dir or tempfile.mkdtemp(prefix="k2jax-convert-bench-"))
    try:
        hf, orbax, back = work / "hf", work / "orbax", work / "hf_back"
        t0 = time.perf_counter()
        total, largest = build_checkpoint(hf, config)
        print(f"synthetic checkpoint: {args.layers} layers, {total / GB:.2f} GB bf16, largest "
              f"tensor {largest / GB:.3f} GB, built in {time.perf_counter() - t0:.0f}s, "
              f"{'cold' if args.cold else 'page-cached'} reads, load average "
              f"{os.getloadavg()[0]:.1f}")
        rows = []
        for run in range(1, args.repeat + 1):
            rows += measure(run, hf, orbax, back, work, args.cold)
        checked = compare_bits(hf, back)
        print(f"round trip bit-exact: {checked} tensors\n")
        print_table(rows, total, largest, config)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(run: int, hf: Path, orbax: Path, back: Path, work: Path, cold: bool) -> list:
    """One round: baselines on the input, then the conversion, for each direction."""
    rows = []
    for name, source, out, argv in (
            ("hf-to-orbax", hf, orbax, ["hf-to-orbax", "--hf", str(hf)]),
            ("orbax-to-hf", orbax, back, ["orbax-to-hf", "--checkpoint", str(orbax),
                                          "--dtype", "bf16"])):
        files = files_under(source)
        if not cold:
            plain_read_seconds(files, cold)  # warm the page cache like a second run would
        read_s = plain_read_seconds(files, cold)
        copy_s = plain_copy_seconds(files, work / "copy", cold)
        if cold:
            evict(files)
        if name == "hf-to-orbax":
            shutil.rmtree(back, ignore_errors=True)  # outputs of the previous round
            shutil.rmtree(orbax, ignore_errors=True)
        conv_s, rss = run_child(["convert", *argv, "--out", str(out), "--no-progress"])
        rows.append((run, name, read_s, copy_s, conv_s, rss, os.getloadavg()[0]))
    return rows


def print_table(rows: list, total: int, largest: int, config: ModelConfig) -> None:
    budget = 2 * largest + 1 * 2**30
    print("| run | direction | GB | plain read GB/s | plain copy GB/s | convert GB/s | "
          "vs read | vs copy | peak RSS GB | RSS / largest | within 2x largest + 1 GiB "
          f"({budget / GB:.2f} GB) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run, name, read_s, copy_s, conv_s, rss, load in rows:
        print(f"| {run} | {name} | {total / GB:.2f} | {total / GB / read_s:.2f} | "
              f"{total / GB / copy_s:.2f} | {total / GB / conv_s:.2f} | {read_s / conv_s:.2f} | "
              f"{copy_s / conv_s:.2f} | {rss / GB:.2f} | {rss / largest:.1f} | "
              f"{'yes' if rss <= budget else 'NO'} | {load:.1f} |")
    k2_bytes = 130e9
    for name in ("hf-to-orbax", "orbax-to-hf"):
        seconds = sorted(r[4] for r in rows if r[1] == name)
        lo, hi = (k2_bytes / (total / seconds[0]) / 60, k2_bytes / (total / seconds[-1]) / 60)
        print(f"K2-65B (130 GB bf16) {name} at these rates: {lo:.0f}-{hi:.0f} min")
    print(f"largest K2 tensor (embedding, {config.vocab_size}x{config.hidden_size} bf16) "
          f"{config.vocab_size * config.hidden_size * 2 / GB:.2f} GB: the same memory bound.")

if __name__ == "__main__":
    main()
