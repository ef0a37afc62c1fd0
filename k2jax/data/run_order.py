"""A run's data order: its config.yaml plus the windows its rollbacks moved.

The moved windows are stored in ONE place, `run_dir/data_order.json`
({"moved_row_ranges": [...]}: the config's data.moved_row_ranges, then each rollback's
[start, count]), written atomically by the trainer at each rollback. It outranks
data.moved_row_ranges of the config (the order the run started with), so a resumed run,
`k2jax data batch --run-dir` and `data locate --run-dir` all follow the order the run actually
read. Checkpoints and config.yaml do not carry the run's moves (runs from before this layout
stored a copy there that nothing read).
"""

from __future__ import annotations

import json
from typing import Optional

import yaml
from etils import epath

from k2jax.config import Config, config_from_dict
from k2jax.atomic_write import write_bytes_atomic
from k2jax.errors import UserError

DATA_ORDER_FILE = "data_order.json"
CONFIG_FILE = "config.yaml"


def read_moved_row_ranges(run_dir: epath.Path) -> Optional[list[list[int]]]:
    """The run's moved windows [[start >= 0, count > 0], ...] (global rows), or None when no
    rollback has written any. It outranks the config (it is the run's own record), so a damaged
    one stops with one line naming it: read wrong, every later batch would be other rows."""
    path = run_dir / DATA_ORDER_FILE
    if not path.exists():
        return None
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


def write_moved_row_ranges(run_dir: epath.Path, moved: list[list[int]]) -> None:
    """Atomically: readers see the old list or the new one, never a partial file."""
    write_bytes_atomic(run_dir / DATA_ORDER_FILE, json.dumps({"moved_row_ranges": moved}).encode())


def run_moved_row_ranges(run_dir: epath.Path, config: Config) -> list[list[int]]:
    """The windows the run's order has moved: its data_order.json, else (no rollback yet) the
    config's data.moved_row_ranges."""
    moved = read_moved_row_ranges(run_dir)
    return config.data.moved_row_ranges if moved is None else moved


def load_run_config(run_dir: epath.Path) -> Config:
    """The config a run was started with (run_dir/config.yaml); its moves: run_moved_row_ranges."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{path}: not found (run_dir must be a k2jax train run directory)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({type(err).__name__})")
    return config_from_dict(data)
