"""A line on stderr for work that shows nothing for minutes (an AOT compile): what is being
done, then the elapsed time every `every_s` seconds until it is over."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def elapsed_ticker(what: str, every_s: float = 30.0, stream=None) -> Iterator[None]:
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
