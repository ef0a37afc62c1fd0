"""A tqdm bar over bytes (throughput in B/s) that also counts tensors."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Context manager: `update(nbytes)` once per tensor. Shown on stderr when `enabled`."""

    def __init__(self, description: str, total_bytes: int, total_tensors: int, enabled: bool):
        self._tensors, self._total_tensors = 0, total_tensors
        self._bar = tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True,
                         unit_divisor=1024, file=sys.stderr, disable=not enabled,
                         dynamic_ncols=True, smoothing=0.1)
        self._bar.set_postfix_str(f"tensors 0/{total_tensors}")

    def update(self, nbytes: int) -> None:
        self._tensors += 1
        self._bar.set_postfix_str(f"tensors {self._tensors}/{self._total_tensors}", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
