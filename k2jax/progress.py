"""Progress of long work on stderr, in the form the reader can use: a tqdm bar on a terminal,
newline-ended lines in a file (a pod's log: `tail`, `grep`), or nothing.

A bar redraws itself with `\\r`: in a file that is ONE endless line (K2's 338,760 steps would
be ~65 MB of it) that neither `tail` nor `grep` can read. So every command takes a mode:

  auto  : a bar when the stream is a terminal, else lines (the default)
  bar   : always the bar
  lines : a line every `every_s` seconds and one at the end
  none  : nothing

Library functions take `progress` as a mode or a bool (True = auto, False = none), so callers
that only switch progress on or off keep working.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, Optional, Union

MODES = ("auto", "bar", "lines", "none")
ProgressArg = Union[bool, str]


def resolve_mode(progress: ProgressArg, stream=None) -> str:
    """"bar", "lines" or "none" for `progress` (a mode or a bool) writing to `stream`."""
    if progress is True or progress is None:
        progress = "auto"
    elif progress is False:
        progress = "none"
    if progress not in MODES:
        raise ValueError(f"progress: expected one of {', '.join(MODES)}, got {progress!r}")
    if progress != "auto":
        return progress
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def format_duration(seconds: float) -> str:
    """3d04h, 2h05m, 4m10s, 12s: short and sortable by eye."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_amount(value: float, unit: str, binary: bool = False) -> str:
    """1.5 GiB, 12.3k row: a count with a scale prefix."""
    base, prefixes = (1024.0, ("", "Ki", "Mi", "Gi", "Ti", "Pi")) if binary else \
        (1000.0, ("", "k", "M", "G", "T", "P"))
    for prefix in prefixes:
        if abs(value) < base or prefix == prefixes[-1]:
            break
        value /= base
    number = f"{value:.0f}" if not prefix and float(value).is_integer() else f"{value:.1f}"
    return f"{number} {prefix}{unit}".rstrip()


class Progress:
    """Counts units (bytes, rows, steps) of `total`. `update(n)` as work is done; use as a
    context manager. In lines mode a line every `every_s` seconds (None: only the final one)
    and a final line when the work completes (none when it fails)."""

    def __init__(self, description: str, total: Optional[float], *, unit: str = "",
                 progress: ProgressArg = True, binary: bool = False, initial: int = 0,
                 every_s: Optional[float] = 30.0, stream=None, tqdm_options: Optional[dict] = None):
        self.stream = stream or sys.stderr
        self.mode = resolve_mode(progress, self.stream)
        self.description, self.total, self.unit, self.binary = description, total, unit, binary
        self.n = self._initial = initial
        self.every_s, self._postfix = every_s, ""
        self._start = self._last_line = time.perf_counter()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            unit_options = ({"unit_scale": True, "unit_divisor": 1024} if binary else {})
            self._bar = tqdm(total=total, desc=description, unit=unit or "it", initial=initial,
                             file=self.stream, dynamic_ncols=True,
                             **unit_options, **(tqdm_options or {}))

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif (self.mode == "lines" and self.every_s is not None
              and time.perf_counter() - self._last_line >= self.every_s):
            self._print(self.status())

    def set_position(self, n: int) -> None:
        """Jump to `n` done (a training run rolled back to an earlier step)."""
        self.n = n
        if self._bar is not None:
            self._bar.n = n
            self._bar.refresh()

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def write(self, message: str) -> None:
        """A message line that does not tear the bar (printed in every mode but none)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.mode == "lines":
            self._print(message)

    def status(self, eta: bool = True) -> str:
        """'DESC: done/total UNIT (pct%), rate UNIT/s, ETA 4m10s[, postfix]'."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed
        done = format_amount(self.n, self.unit, self.binary)
        parts = [f"{self.description}: {done}"]
        if self.total:
            parts[0] += (f" of {format_amount(self.total, self.unit, self.binary)} "
                         f"({100.0 * self.n / self.total:.0f}%)")
        parts.append(f"{format_amount(rate, self.unit, self.binary)}/s")
        if eta and self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        return ", ".join(parts)

    def _print(self, line: str) -> None:
        self._last_line = time.perf_counter()
        print(line, file=self.stream, flush=True)

    def close(self, completed: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif (self.mode == "lines" and completed and self.every_s is not None
              and (self.total or self.n)):  # nothing to do: nothing to report
            elapsed = time.perf_counter() - self._start
            self._print(f"{self.status(eta=False)}; done in {format_duration(elapsed)}")
            self.mode = "none"  # closed: a second close prints nothing

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(completed=exc_type is None)


@contextlib.contextmanager
def elapsed_ticker(what: str, every_s: float = 30.0, stream=None) -> Iterator[None]:
    """For work that shows nothing for minutes (an AOT compile): what is being done, then the
    elapsed time every `every_s` seconds until it is over, as lines (a bar has nothing to
    count)."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    print(f"{what} ...", file=stream, flush=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            print(f"  ... {time.perf_counter() - start:.0f} s", file=stream, flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    outcome = "failed after"
    try:
        yield
        outcome = "done in"
    finally:
        done.set()
        ticker.join()
        print(f"{what.split(' (')[0]}: {outcome} {time.perf_counter() - start:.1f} s",
              file=stream, flush=True)
