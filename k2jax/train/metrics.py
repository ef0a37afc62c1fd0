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


class MetricsWriter:
    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = storage_path(run_dir)
        if not enabled:
            return
        self.tensorboard_dir = self.run_dir / "tensorboard"
        self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
        self._events = EventFileWriter(str(self.tensorboard_dir))
        self._jsonl = (self.run_dir / "metrics.jsonl").open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def record(self, step: int, values: dict[str, Any]) -> None:
        """One JSON line per logged step (and the same values as TensorBoard scalars)."""
        if not self.enabled:
            return
        self.scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._events.flush()
            self._events.close()
            self._jsonl.close()
