"""Real small or read-only file systems for the reliability tests: a tmpfs mounted where the
test may mount (root; chmod does not stop root's writes), else the test is skipped."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str = "1m") -> Iterator[Path]:
    mount_point.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mount_point)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs privileges")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def make_read_only(mount_point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
