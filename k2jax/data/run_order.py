"""A run's data order: its config.yaml plus the windows its rollbacks moved.

Rollbacks append [start, count] windows to `run_dir/data_order.json`
({"moved_row_ranges": [...]}); it outranks data.moved_row_ranges of the config, so a resumed
run, `k2jax data batch --run-dir` and `data locate --run-dir` all follow the order the run
actually read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import yaml
from etils import epath

from k2jax.config import Config, config_from_dict
from k2jax.data.chunk_files import write_bytes_atomic
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


def with_run_order(config: Config, run_dir: epath.Path) -> Config:
    """`config` with the run's recorded moves in place of its data.moved_row_ranges."""
    moved = read_moved_row_ranges(run_dir)
    if moved is not None:
        config.data = dataclasses.replace(config.data, moved_row_ranges=moved)
    return config


def load_run_config(run_dir: epath.Path) -> Config:
    """The config a run was started with (run_dir/config.yaml), its recorded moves applied."""
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise UserError(f"{path}: not found (--run-dir must be a k2jax train run directory)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({type(err).__name__})")
    return with_run_order(config_from_dict(data), run_dir)
