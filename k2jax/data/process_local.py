"""Readers whose open handles belong to one process.

A chunk reader caches open handles (file descriptors, memory maps) behind a lock, because Grain
reads batches from several threads. Neither crosses a process: a pickled copy (Grain's worker
processes) starts with an empty cache and a lock of its own.
"""

from __future__ import annotations

import threading


class ProcessLocalHandles:
    """Mixin: `self._lock` and the dict attribute named by `_handles_attr` are not pickled."""

    _handles_attr: str

    def __getstate__(self):
        state = self.__dict__.copy()
        state[self._handles_attr] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
