"""A training run's directory, local or gs://: the one place its layout is spelled.

  config.yaml              the resolved config of the run's latest start (written once the
                           resume succeeded, so a refused resume leaves it alone)
  data_order.json          the windows the run's rollbacks moved: {"moved_row_ranges": [...]}
                           (the config's data.moved_row_ranges, then each rollback's
                           [start, count]); it outranks the config, so a resumed run and the
                           data commands follow the order the run actually read
  checkpoints/<step>/      Orbax steps (k2jax/checkpoint/manager.py)
  metrics.jsonl            one JSON line per logged step  } append-only logs
  spikes.jsonl             one JSON line per loss spike   } (k2jax/append_log.py)
  tensorboard/             TensorBoard event files        }
  k2jax.lock               held while `k2jax train` runs (k2jax/checkpoint/run_lock.py)
  damaged_checkpoints/     steps that failed to restore, set aside  } k2jax/checkpoint/
  superseded_checkpoints/  steps newer than train.resume_step       } set_aside.py

On gs:// the directory exists once an object is under it (GCS has no empty directories), so
`ensure()` checks the bucket instead of making anything.
"""

from __future__ import annotations

import json
import os

import yaml
from etils import epath

from k2jax.atomic_write import write_bytes_atomic
from k2jax.config import Config, config_from_dict
from k2jax.storage import is_remote, remote
from k2jax.errors import UserError, one_line
from k2jax.files import read_json, read_yaml
from k2jax.paths import storage_path

CONFIG_FILE = "config.yaml"
DATA_ORDER_FILE = "data_order.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SPIKES_FILE = "spikes.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = "k2jax.lock"
DAMAGED_DIR = "damaged_checkpoints"
# Steps newer than an explicit train.resume_step: the resumed run writes those step numbers
# again, so the old ones move here (kept, out of Orbax's way).
SUPERSEDED_DIR = "superseded_checkpoints"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = storage_path(path)
        self.remote = is_remote(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    config_file = property(lambda self: self.path / CONFIG_FILE)
    data_order_file = property(lambda self: self.path / DATA_ORDER_FILE)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS_DIR)
    metrics_file = property(lambda self: self.path / METRICS_FILE)
    spikes_file = property(lambda self: self.path / SPIKES_FILE)
    tensorboard_dir = property(lambda self: self.path / TENSORBOARD_DIR)
    lock_file = property(lambda self: self.path / LOCK_FILE)

    def set_aside_dir(self, folder: str) -> epath.Path:
        """DAMAGED_DIR or SUPERSEDED_DIR."""
        return self.path / folder

    def ensure(self) -> None:
        """Creates a local run_dir (and parents); on gs:// checks that the bucket is there and
        readable. A path that cannot be a run directory is one line."""
        if self.remote:
            if not os.fspath(self.path).startswith("gs://"):  # the lock and logs need GCS's API
                raise UserError(f"train.run_dir {self.path}: expected a local path or gs://")
            remote.check_bucket(self.path, "train.run_dir")
            if self.path.is_file():
                raise UserError(f"train.run_dir {self.path}: is an object, expected a prefix")
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as err:
            raise UserError(f"train.run_dir {self.path}: not a directory "
                            f"({one_line(err)})") from err
        except OSError as err:
            raise UserError(f"train.run_dir {self.path}: cannot be created "
                            f"({one_line(err)})") from err
        if not self.path.is_dir():
            raise UserError(f"train.run_dir {self.path}: exists and is not a directory")

    # -- config.yaml ---------------------------------------------------------------------------

    def write_config(self, config: Config) -> None:
        write_bytes_atomic(self.config_file,
                           yaml.safe_dump(config.to_dict(), sort_keys=False).encode())

    def load_config(self) -> Config:
        """The config the run was started with; its moves: `moved_row_ranges`."""
        data = read_yaml(self.config_file, "it is the config `k2jax train` writes into a run "
                                            "directory")
        if data is None:
            raise UserError(f"{self.config_file}: not found (not a k2jax train run directory)")
        return config_from_dict(data)

    # -- data_order.json -----------------------------------------------------------------------

    def read_moved_row_ranges(self) -> list[list[int]] | None:
        """The run's moved windows [[start >= 0, count > 0], ...] (global rows), or None when no
        rollback has written any. It outranks the config (it is the run's own record), so a
        damaged one stops with one line naming it: read wrong, every later batch would be
        other rows."""
        path = self.data_order_file
        remedy = ("it lists the rows moved by rollbacks, so restore it rather than delete it")
        record = read_json(path, remedy, what="a k2jax data order record")
        if record is None:
            return None
        if not isinstance(record, dict) or "moved_row_ranges" not in record:
            raise UserError(f"{path}: not a k2jax data order record (no 'moved_row_ranges'); "
                            f"{remedy}")
        moved = record["moved_row_ranges"]
        if not isinstance(moved, list):
            raise UserError(f"{path}: 'moved_row_ranges' must be a list, got {moved!r}")
        for i, window in enumerate(moved):
            if not (isinstance(window, list) and len(window) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in window)
                    and window[0] >= 0 and window[1] > 0):
                raise UserError(f"{path}: moved_row_ranges[{i}] must be [start >= 0, "
                                f"count > 0] (integers), got {window!r}")
        return moved

    def write_moved_row_ranges(self, moved: list[list[int]]) -> None:
        """Atomically: readers see the old list or the new one, never a partial file."""
        write_bytes_atomic(self.data_order_file,
                           json.dumps({"moved_row_ranges": moved}).encode())

    def moved_row_ranges(self, config: Config) -> list[list[int]]:
        """The windows the run's order has moved: data_order.json, else (no rollback yet) the
        config's data.moved_row_ranges."""
        moved = self.read_moved_row_ranges()
        return config.data.moved_row_ranges if moved is None else moved
