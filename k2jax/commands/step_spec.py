"""Parse step lists such as `94100,94101:94105`.

`A:B` is half-open, like a Python slice and like every row window in k2jax: `94101:94105` means
steps 94101, 94102, 94103, 94104. A single number is one step. Steps are 0-based batch indices:
step t is the batch of global rows [t * B, (t + 1) * B).
"""

from __future__ import annotations

from k2jax.errors import UserError

MAX_STEPS = 100_000  # a guard against a typo such as 0:94100000 that would run for months


def parse_steps(spec: str) -> list[int]:
    """Steps in the order given, duplicates dropped. Raises UserError on any malformed piece."""
    steps: list[int] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            raise UserError(f"--steps {spec!r}: empty item (expected e.g. 94100,94101:94105)")
        try:
            if ":" in piece:
                start_text, stop_text = piece.split(":", 1)
                start, stop = int(start_text), int(stop_text)
                if start >= stop:
                    raise UserError(f"--steps {spec!r}: range {piece!r} is empty (A:B is "
                                    "half-open and needs A < B)")
                steps.extend(range(start, stop))
            else:
                steps.append(int(piece))
        except ValueError:
            raise UserError(f"--steps {spec!r}: {piece!r} is not a step or a half-open range "
                            "A:B of integers")
        if steps and min(steps) < 0:
            raise UserError(f"--steps {spec!r}: steps must be >= 0")
        if len(steps) > MAX_STEPS:
            raise UserError(f"--steps {spec!r}: more than {MAX_STEPS} steps")
    return list(dict.fromkeys(steps))


def parse_range(spec: str) -> tuple[int | None, int | None]:
    """`A:B`, `A:` or `:B` (half-open; a missing end is unbounded) for compare-curves."""
    if ":" not in spec:
        raise UserError(f"--steps {spec!r}: expected a half-open range A:B (either end optional)")
    start_text, stop_text = (t.strip() for t in spec.split(":", 1))
    try:
        start = int(start_text) if start_text else None
        stop = int(stop_text) if stop_text else None
    except ValueError:
        raise UserError(f"--steps {spec!r}: range ends must be integers")
    if start is not None and stop is not None and start >= stop:
        raise UserError(f"--steps {spec!r}: range is empty (A:B is half-open and needs A < B)")
    return start, stop
