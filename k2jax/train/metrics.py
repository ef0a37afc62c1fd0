"""Run metrics: TensorBoard scalars, `metrics.jsonl` and `spikes.jsonl`, written by process 0.

All three are append-only logs (k2jax/append_log.py), local or on gs://. TensorBoard events are
framed with the `tensorboard` package's own record writer and protos (no TensorFlow needed) into
an event file of this writer's own (`events.out.tfevents.<time>.<host>.<pid>.<n>`), so on gs://
the events are appended to an object like the JSON logs (tensorboard's own writer would
rewrite the whole file at every flush there).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from k2jax.append_log import AppendLog
from k2jax.run_dir import RunDir
from k2jax.storage_errors import writing


_WRITER_IDS = itertools.count()  # two writers of one process never share an event file


class MetricsWriter:
    def __init__(self, run_dir: RunDir | str, enabled: bool = True):
        self.enabled = enabled
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        if not enabled:
            return
        self.tensorboard_dir = self.run.tensorboard_dir
        self.jsonl_path = self.run.metrics_file
        if not self.run.remote:
            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            _drop_partial_last_line(self.jsonl_path)
        events = self.tensorboard_dir / (f"events.out.tfevents.{int(time.time()):010d}."
                                         f"{socket.gethostname()}.{os.getpid()}."
                                         f"{next(_WRITER_IDS)}")
        self._events = RecordWriter(AppendLog(events))
        self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._jsonl = AppendLog(self.jsonl_path)
        self._spikes = None

    def _add_event(self, event) -> None:
        with writing(self.tensorboard_dir):  # a full disk there names no file of its own
            self._events.write(event.SerializeToString())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in values.items()])
        self._add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def record(self, step: int, values: dict[str, Any]) -> None:
        """One JSON line per logged step (and the same values as TensorBoard scalars)."""
        if not self.enabled:
            return
        self.scalars(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})
        with writing(self.jsonl_path):
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def spike(self, event: dict[str, Any]) -> None:
        """One JSON line in spikes.jsonl."""
        if not self.enabled:
            return
        if self._spikes is None:
            self._spikes = AppendLog(self.run.spikes_file)
        with writing(self.run.spikes_file):
            self._spikes.write(json.dumps(event) + "\n")

    def flush(self) -> None:
        """Everything written so far is in storage (on gs:// it is otherwise kept up to
        k2jax.append_log.FLUSH_SECONDS): the trainer calls it with each checkpoint."""
        self._each_log("flush")

    def close(self) -> None:
        self._each_log("close")

    def _each_log(self, method: str) -> None:
        """Calls `method` of every open log, a failure worded with that log's path."""
        if not self.enabled:
            return
        for log, path in ((self._events, self.tensorboard_dir), (self._jsonl, self.jsonl_path),
                          (self._spikes, self.run.spikes_file)):
            if log is not None:
                with writing(path):
                    getattr(log, method)()


def _drop_partial_last_line(path) -> None:
    """A run stopped mid-write (a full disk, SIGKILL) can leave half a JSON line at the end of
    metrics.jsonl; the resumed run's lines would be glued to it. Cut it (it is no record).
    (On gs:// an object holds whole flushes only.)"""
    if not path.exists():
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
