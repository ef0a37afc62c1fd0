"""Conversion progress: bytes (throughput in B/s) that also counts tensors, shown as
k2jax.progress chooses (a bar on a terminal, lines in a log file, or nothing)."""

from __future__ import annotations

from k2jax.progress import Progress as _Progress
from k2jax.progress import ProgressArg


class Progress(_Progress):
    """`update(nbytes)` once per tensor. `enabled`: a progress mode or a bool."""

    def __init__(self, description: str, total_bytes: int, total_tensors: int,
                 enabled: ProgressArg):
        super().__init__(description, total_bytes, unit="B", binary=True, progress=enabled,
                         tqdm_options={"smoothing": 0.1})
        self._tensors, self._total_tensors = 0, total_tensors
        self.set_postfix_str(f"tensors 0/{total_tensors}")

    def update(self, nbytes: int) -> None:
        self._tensors += 1
        self.set_postfix_str(f"tensors {self._tensors}/{self._total_tensors}")
        super().update(nbytes)
