"""Data benchmark: index build speed vs a plain read, loader tokens/s for jsonl and packed rows,
and the loader on local disk beside gs:// (a local GCS protocol server) in the same run.

    JAX_PLATFORMS=cpu python benchmarks/data_loader.py [--size-mb 400] [--dir /tmp/x] [--no-gcs]

The gs:// column reads the same files uploaded to fake-gcs-server on 127.0.0.1 (tests/
gcs_server.py) through a byte-counting forwarder (tests/counting_proxy.py): rows/s, and bytes
downloaded per row (HTTP included) against the row's own size. Loopback has no network latency
or bandwidth limit, so it measures k2jax's request pattern and CPU cost, not a real bucket's.

Writes K2-like chunk files (2048 random ids per row plus K2's metadata fields) into a temporary
directory (removed afterwards unless --dir is given), never into the repository. Reads are from
the page cache when the files fit in RAM, so the index figure is its CPU cost relative to a
plain read of the same bytes; on a TPU VM's persistent disk or GCS the read dominates both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io_floor  # noqa: E402  (benchmarks/io_floor.py, next to this script)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from k2jax.config import K2_PRESET, DataConfig, load_config  # noqa: E402
from k2jax.data.chunk_index import build_index  # noqa: E402
from k2jax.data.chunked_source import open_chunk_source  # noqa: E402
from k2jax.data.packed import pack_chunks  # noqa: E402
from k2jax.data.loader import StepLoader  # noqa: E402

K2_VOCAB = load_config(K2_PRESET).model.vocab_size
K2_ROWS = load_config(K2_PRESET).data.global_batch_size


def write_chunks(directory: Path, num_files: int, mb_per_file: float, seq_len: int) -> None:
    rng = np.random.default_rng(0)
    for chunk_id in range(num_files):
        with open(directory / f"chunk_{chunk_id}.jsonl", "w") as f:
            written, line = 0, 0
            while written < mb_per_file * 2**20:
                text = json.dumps({"token_ids": rng.integers(0, K2_VOCAB, seq_len).tolist(),
                                   "source": "bench", "subset_name": "bench",
                                   "src_filename": "bench.jsonl", "line_idx_in_src": line}) + "\n"
                f.write(text)
                written += len(text)
                line += 1


def loader_tokens_per_second(loader: StepLoader, steps: int, grain_threads: int = 0
                             ) -> float:
    tokens = steps * loader.host_batch_size * loader.data.seq_len
    start = time.perf_counter()
    if grain_threads:
        for _ in loader.prefetched_host_batches(0, steps, worker_count=0,
                                                prefetch=grain_threads):
            pass
    else:
        for step in range(steps):
            loader.host_batch(step)
    return tokens / (time.perf_counter() - start)


def gcs_comparison(data: Path, packed: Path, args) -> list[tuple[str, str, str, str]]:
    """(measurement, local disk, gs://, note) rows: the same loader runs on both."""
    import fsspec
    from counting_proxy import CountingProxy
    from gcs_server import GCSServer, client_environment, set_environment

    server = GCSServer(Path(tempfile.mkdtemp(prefix="k2jax-bench-gcs-"))).start()
    proxy = CountingProxy(server.port)
    set_environment(client_environment(proxy.endpoint))
    try:
        bucket = server.bucket("bench")
        fs = fsspec.filesystem("gs")
        for path in sorted(data.glob("chunk_*.jsonl")):
            fs.put_file(str(path), f"{bucket}/jsonl/{path.name}")
        fs.put(str(packed) + "/", f"{bucket}/packed/", recursive=True)
        total_mb = sum(p.stat().st_size for p in data.glob("chunk_*.jsonl")) / 2**20
        timings = {}
        for where, path in (("local", data), ("gs", f"{bucket}/jsonl")):
            if where == "local":
                shutil.rmtree(data / ".k2index", ignore_errors=True)
            proxy.reset()
            start = time.perf_counter()
            build_index(path, workers=args.files, progress=False)
            timings[where] = total_mb / (time.perf_counter() - start)
        out = [(f"k2jax data index, {args.files} workers: MB/s", f"{timings['local']:,.0f}",
                f"{timings['gs']:,.0f}", "gs:// reads each chunk once in 16 MiB ranged GETs")]
        config = DataConfig(source="k2", path=str(data), order="sequential",
                            seq_len=args.seq_len, global_batch_size=args.host_batch,
                            micro_batch_size=args.host_batch)
        row_bytes = {"jsonl": sum(p.stat().st_size for p in data.glob("chunk_*.jsonl")),
                     "packed": 2 * args.seq_len}
        for form, local in (("jsonl", data), ("packed", packed)):
            measured = {}
            for _ in range(2):  # interleaved rounds, best of each: the machine may be shared
                for where, path in (("local", str(local)), ("gs", f"{bucket}/{form}")):
                    source = open_chunk_source(path, "sequential", args.seq_len, K2_VOCAB, form)
                    loader = StepLoader(source, config)
                    steps = min(source.num_rows // args.host_batch, 40)
                    proxy.reset()
                    tps = loader_tokens_per_second(loader, steps, grain_threads=2)
                    per_row = proxy.reset() / (steps * args.host_batch)
                    best = measured.get(where, (0.0, per_row))[0]
                    measured[where] = (max(best, tps / args.seq_len), per_row)
                    if form == "jsonl":
                        row_bytes["jsonl_row"] = row_bytes["jsonl"] / source.num_rows
            own = row_bytes["jsonl_row"] if form == "jsonl" else row_bytes["packed"]
            out.append((f"loader {form} via Grain (2 threads), host batch {args.host_batch}: "
                        "rows/s", f"{measured['local'][0]:,.0f}", f"{measured['gs'][0]:,.0f}",
                        f"K2 needs {K2_ROWS / 20:,.0f} rows/s in all ({K2_ROWS} per ~20 s "
                        "step), per host its share"))
            out.append((f"loader {form}: bytes downloaded per row", "-",
                        f"{measured['gs'][1]:,.0f}", f"a row is {own:,.0f} bytes"))
        return out
    finally:
        proxy.stop()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=400, help="total jsonl size")
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--host-batch", type=int, default=64)
    parser.add_argument("--dir", default=None, help="keep the files here (default: a temp dir)")
    parser.add_argument("--no-gcs", action="store_true", help="skip the gs:// comparison")
    args = parser.parse_args()

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="k2jax-bench-"))
    data, packed = root / "jsonl", root / "packed"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        write_chunks(data, args.files, args.size_mb / args.files, args.seq_len)
        paths = sorted(data.glob("chunk_*.jsonl"))
        total_mb = sum(p.stat().st_size for p in paths) / 2**20
        io_floor.plain_read_seconds(paths, 16 << 20)  # warm the page cache the same way for both
        # The machine may be shared: interleave plain reads and index builds in rounds and
        # report the median per-round ratio. The baseline is the faster of small and large
        # plain reads in that round.
        for workers in (1, args.files):
            ratios, best_read, best_index = [], float("inf"), float("inf")
            for _ in range(5):
                read_s = min(io_floor.plain_read_seconds(paths, size) for size in (256 << 10, 16 << 20))
                shutil.rmtree(data / ".k2index", ignore_errors=True)
                start = time.perf_counter()
                build_index(data, workers=workers, progress=False)
                index_s = time.perf_counter() - start
                ratios.append(read_s / index_s)
                best_read, best_index = min(best_read, read_s), min(best_index, index_s)
            if workers == 1:
                rows.append(("plain sequential read (best of 256 KiB / 16 MiB blocks)",
                             f"{total_mb / best_read:,.0f} MB/s", "baseline, page cache"))
            rows.append((f"k2jax data index, {workers} worker(s)",
                         f"{total_mb / best_index:,.0f} MB/s",
                         f"{float(np.median(ratios)):.2f}x plain read (median of 5 rounds)"))

        start = time.perf_counter()
        pack_chunks(data, packed, seq_len=args.seq_len, vocab_size=K2_VOCAB, workers=args.files,
                    progress=False)
        rows.append(("k2jax data pack (json parse, %d procs)" % args.files,
                     f"{total_mb / (time.perf_counter() - start):,.0f} MB/s", "one-off"))

        config = DataConfig(source="k2", path=str(data), order="sequential",
                            seq_len=args.seq_len, global_batch_size=args.host_batch,
                            micro_batch_size=args.host_batch)
        for form, path in (("jsonl", data), ("packed", packed)):
            source = open_chunk_source(path, "sequential", args.seq_len, K2_VOCAB, form)
            loader = StepLoader(source, config)
            steps = min(source.num_rows // args.host_batch, 200 if form == "packed" else 40)
            tps = loader_tokens_per_second(loader, steps)
            rows.append((f"loader {form}, host batch {args.host_batch}, 1 core",
                         f"{tps / 1e6:,.2f} M tokens/s", f"{steps} steps"))
            tps = loader_tokens_per_second(loader, steps, grain_threads=2)
            rows.append((f"loader {form} via Grain (2 threads)", f"{tps / 1e6:,.2f} M tokens/s",
                         f"{steps} steps"))
        gcs_rows = [] if args.no_gcs else gcs_comparison(data, packed, args)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print(f"# data benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()} "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), {args.files} files, "
          f"{total_mb:,.0f} MB jsonl, seq_len {args.seq_len}")
    print("| measurement | rate | note |\n|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate} | {note} |")
    if gcs_rows:
        print("\n| measurement | local disk | gs:// (local server, loopback) | note |\n"
              "|---|---|---|---|")
        for name, local, remote, note in gcs_rows:
            print(f"| {name} | {local} | {remote} | {note} |")


if __name__ == "__main__":
    main()
