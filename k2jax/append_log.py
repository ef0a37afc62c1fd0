"""A log that only grows (metrics.jsonl, spikes.jsonl, TensorBoard event files), local or gs://.

Local: a file opened for appending, each write flushed to the OS at once.
gs://: GCS has no append, and one object may be written about once a second. Writes are kept in
memory and appended to the object at most every `FLUSH_SECONDS` (and at `flush()`, which the
trainer calls at each checkpoint, and at `close()`) by composing an uploaded part onto it
(k2jax/storage/gcs_objects.py `append_object`): the object always holds whole flushes, never half of one, and
its past is never rewritten. A kill -9 loses at most the writes since the last flush.
"""

from __future__ import annotations

import os
import time
import uuid

from k2jax.storage import gcs_objects, is_remote
from k2jax.storage_errors import writing

FLUSH_SECONDS = 10.0


class AppendLog:
    def __init__(self, path, flush_seconds: float = FLUSH_SECONDS):
        self.path = path
        self.remote = is_remote(path)
        self.flush_seconds = flush_seconds
        self._pending: list[bytes] = []
        self._last_flush = time.monotonic()
        self._file = None if self.remote else open(os.fspath(path), "ab")
        # One writer per run (the run_dir lock), but a unique part name keeps a crashed
        # writer's leftover part from ever being composed by the next one.
        self._part = f".{os.path.basename(os.fspath(path))}.part-{uuid.uuid4().hex[:8]}"

    def write(self, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
            return
        self._pending.append(data)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            return
        if self._pending:
            data, self._pending = b"".join(self._pending), []
            with writing(self.path):
                gcs_objects.append_object(self.path, data, self._part)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
            self.flush()

