"""`run_dir/data_order.json`: the row windows rollbacks moved to the end of the data order.

It outranks the config (it is the run's own record), so a damaged one must stop the run with one
line naming it: read wrong, every later batch would silently be other rows.
"""

from __future__ import annotations

import json

from etils import epath

from k2jax.errors import UserError


def read_moved_row_ranges(path: epath.Path) -> list[list[int]]:
    """The `moved_row_ranges` of `path`: [[start >= 0, count > 0], ...] (global rows)."""
    try:
        moved = json.loads(path.read_text())["moved_row_ranges"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"{path}: not a k2jax data order record ({type(err).__name__}: {err}); "
                        "it lists the rows moved by rollbacks, so restore it rather than delete "
                        "it") from err
    if not isinstance(moved, list):
        raise UserError(f"{path}: 'moved_row_ranges' must be a list, got {moved!r}")
    for i, window in enumerate(moved):
        if not (isinstance(window, list) and len(window) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
                and window[0] >= 0 and window[1] > 0):
            raise UserError(f"{path}: moved_row_ranges[{i}] must be [start >= 0, count > 0] "
                            f"(integers), got {window!r}")
    return moved
