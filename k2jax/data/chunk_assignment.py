"""Which output chunks each tokenized row goes to: K2's upsampling rule (k2-data-prep `gather.py`).

Subsets are visited in sorted name order and each subset's files in sorted name order; one
counter runs over all their rows. A subset repeated `n_repeat` times uses a cycle of
`int(num_chunks / n_repeat)` "pseudo chunks": the counter is reduced modulo that cycle at the
start of each file, and a row goes to every chunk t with `t % cycle == counter` before the counter
advances. So n_repeat 3 of 360 chunks puts each row in 3 chunks (cycle 120), n_repeat 0.5 keeps
only the rows whose counter is below 360 (cycle 720: half the subset), and n_repeat 1 is
round-robin. A subset with n_repeat 0 is left out (K2 skipped `redpajama.c4`) and leaves the
counter alone.
"""

from __future__ import annotations

import fnmatch

from k2jax.errors import UserError

# gather.py's table, first match wins; anything else is 1.
K2_REPEATS = (("redpajama.c4", 0.0), ("dm-math", 3.0), ("pubmed-abstracts", 3.0),
              ("uspto", 3.0), ("redpajama.wikipedia", 6.0), ("redpajama.arxiv", 1.0),
              ("redpajama.*", 3.0), ("starcoder.*", 0.5))
K2_REPEATS_TEXT = ",".join(f"{pattern}={n:g}" for pattern, n in K2_REPEATS)


def parse_repeats(text: str) -> tuple[tuple[str, float], ...]:
    """'PATTERN=N,...' (fnmatch patterns on subset names, first match wins) -> table."""
    table = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, value = item.rpartition("=")
        try:
            repeat = float(value)
        except ValueError:
            repeat = -1.0
        if not sep or not pattern or repeat < 0:
            raise UserError(f"repeat {item!r}: expected SUBSET_PATTERN=N with N >= 0")
        table.append((pattern, repeat))
    return tuple(table)


def repeat_for(subset: str, table: tuple[tuple[str, float], ...]) -> float:
    return next((n for pattern, n in table if fnmatch.fnmatchcase(subset, pattern)), 1.0)


def cycle_length(subset: str, repeat: float, num_chunks: int) -> int:
    """gather.py's `pseudo_n_chunks = int(N_CHUNKS / n_repeat)` (repeat > 0)."""
    cycle = int(num_chunks / repeat)
    if cycle < 1:
        raise UserError(f"repeat: subset {subset!r} repeated {repeat:g} times needs at least "
                        f"{repeat:g} chunks, got num_chunks {num_chunks}")
    return cycle


class ChunkAssigner:
    """The running counter of gather.py. `start_file(cycle)` before each file's rows, then
    `next_row()` -> the chunk ids of that row, ascending (may be empty)."""

    def __init__(self, num_chunks: int):
        self.num_chunks = num_chunks
        self.counter = 0
        self.cycle = 1

    def start_file(self, cycle: int) -> None:
        self.cycle = cycle
        self.counter %= cycle

    def next_row(self) -> range:
        chunks = range(self.counter, self.num_chunks, self.cycle)
        self.counter = (self.counter + 1) % self.cycle
        return chunks
