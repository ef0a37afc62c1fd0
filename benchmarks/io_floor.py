"""The I/O floor the data and conversion benchmarks compare against: a plain sequential read."""

from __future__ import annotations

import time
from pathlib import Path


def plain_read_seconds(paths: list[Path], block_bytes: int = 64 << 20) -> float:
    """Seconds to read every file once, sequentially, through one reused `block_bytes` buffer."""
    buffer = bytearray(block_bytes)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - start
