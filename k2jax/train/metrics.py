"""Run metrics: TensorBoard scalars and `metrics.jsonl`, written by process 0 only.

TensorBoard events are written with the `tensorboard` package's own event writer and protos
(no TensorFlow needed).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from k2jax.paths import storage_path
from k2jax.storage_errors import writing


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = storage_path(run_dir)
        if not enabled:
            return
        self.tensorboard_dir = self.run_dir / "tensorboard"
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        self._events = EventFileWriter(str(self.tensorboard_dir))
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        _drop_partial_last_line(self.jsonl_path)
        self._jsonl = self.jsonl_path.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        with writing(self.tensorboard_dir):  # a full disk there names no file of its own
            self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                   summary=summary))

    def record(self, step: int, values: dict[str, Any]) -> None:
        """One JSON line per logged step (and the same values as TensorBoard scalars)."""
        if not self.enabled:
            return
        self.scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})
        with writing(self.jsonl_path):
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with writing(self.run_dir / name), (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            with writing(self.tensorboard_dir):
                self._events.flush()
                self._events.close()
            with writing(self.jsonl_path):
                self._jsonl.close()


def _drop_partial_last_line(path) -> None:
    """A run stopped mid-write (a full disk, SIGKILL) can leave half a JSON line at the end of
    metrics.jsonl; the resumed run's lines would be glued to it. Cut it (it is no record)."""
    if "://" in str(path) or not path.exists():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, 2)
        if size == 0:
            return
        f.seek(max(size - 1, 0))
        if f.read(1) == b"\n":
            return
        tail_start = max(size - (1 << 20), 0)  # a record is a few hundred bytes
        f.seek(tail_start)
        tail = f.read()
        cut = tail.rfind(b"\n")
        if cut >= 0 or tail_start == 0:
            f.truncate(tail_start + cut + 1)
