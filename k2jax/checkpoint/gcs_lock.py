"""The run_dir lock on gs://: a lock object with a lease, kept alive by a heartbeat.

GCS has no lock that dies with its holder, so the lock is the object `run_dir/k2jax.lock`:
  taking it    an upload with ifGenerationMatch=0, which GCS refuses when the object exists, so
               of two trainers starting together exactly one creates it
  holding it   a heartbeat thread rewrites it every lease/4 seconds, each write conditional on
               the generation the holder last wrote (a holder that lost the lock notices)
  staleness    a holder killed by SIGKILL or a lost VM stops heartbeating. A newcomer that finds
               the lock takes it over once it is stale: its last write (the server's `updated`
               time) is older than the holder's lease, or the newcomer has watched it unchanged
               for a whole lease (which needs no agreement between clocks). A lock that changes
               while watched has a live holder: the newcomer is refused, naming it.
  releasing    the holder deletes it (conditional on its generation) when `train` ends.
The lease is K2JAX_RUN_LOCK_LEASE_S seconds (default 120), stored in the lock object so that
newcomers apply the holder's own lease. A trainer restarted right after a kill therefore waits
at most one lease before it starts.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from k2jax.errors import UserError, one_line
from k2jax.storage import gcs_objects

LEASE_ENV = "K2JAX_RUN_LOCK_LEASE_S"
DEFAULT_LEASE_S = 120.0


def lease_seconds() -> float:
    text = os.environ.get(LEASE_ENV)
    if text is None:
        return DEFAULT_LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{LEASE_ENV}={text!r}: expected a positive number of seconds")
    return value


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process (its lock object is unreadable)"
    return (f"host {holder.get('host')} PID {holder.get('pid')} "
            f"(since {holder.get('started')})")


class GcsRunLock:
    """`with GcsRunLock(run_dir):` holds the lock; a live holder raises UserError naming it.
    `enabled=False` (processes other than 0) does nothing."""

    def __init__(self, run_dir, enabled: bool = True, log=None):
        self.run_dir = run_dir
        self.path = os.fspath(run_dir.lock_file)
        self.enabled = enabled
        self.lease = lease_seconds() if enabled else DEFAULT_LEASE_S
        self.log = log or (lambda message: print(f"[k2jax] {message}", file=sys.stderr))
        self.token = uuid.uuid4().hex
        self._started = _now().isoformat(timespec="seconds")
        self._generation: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None

    def _record(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "started": self._started, "lease_seconds": self.lease,
                           "heartbeat": _now().isoformat(timespec="seconds")}).encode()

    def _holder(self, generation: int) -> Optional[dict]:
        try:
            return json.loads(gcs_objects.read(self.path, generation) or b"")
        except ValueError:
            return None

    def acquire(self) -> None:
        if not self.enabled:
            return
        self.run_dir.ensure()
        watched: Optional[tuple[int, float]] = None  # (generation, when first seen)
        while self._generation is None:
            try:
                self._generation = gcs_objects.write(self.path, self._record(), if_generation=0)
                break
            except FileExistsError:
                pass
            except Exception as err:  # noqa: BLE001 - permission, network
                raise UserError(f"train.run_dir {self.run_dir}: cannot write its lock object "
                                f"{self.path} ({one_line(err)})") from err
            current = gcs_objects.stat(self.path)
            if current is None:
                continue  # released between our create and our look
            holder = self._holder(current["generation"])
            lease = float((holder or {}).get("lease_seconds", DEFAULT_LEASE_S))
            age = (_now() - current["updated"]).total_seconds()
            if watched is None or watched[0] != current["generation"]:
                if watched is not None:  # it changed while we watched: a live holder
                    raise UserError(f"train.run_dir {self.run_dir} is in use by "
                                    f"{_describe(holder)}; lock object {self.path}")
                watched = (current["generation"], time.monotonic())
                if age <= lease:
                    self.log(f"run_dir lock {self.path} held by {_describe(holder)}, last "
                             f"written {age:.0f} s ago: waiting up to {lease:.0f} s for a "
                             "heartbeat or for its lease to run out")
            if age > lease or time.monotonic() - watched[1] > lease:
                try:
                    self._generation = gcs_objects.write(self.path, self._record(),
                                                 if_generation=current["generation"])
                except FileExistsError:
                    continue  # another newcomer took it first: look again
                self.log(f"took over the stale run_dir lock of {_describe(holder)} (no "
                         f"heartbeat for {max(age, time.monotonic() - watched[1]):.0f} s, "
                         f"lease {lease:.0f} s)")
                break
            time.sleep(min(2.0, lease / 8))
        self._verify()
        self._thread = threading.Thread(target=self._heartbeat, name="k2jax-run-lock",
                                        daemon=True)
        self._thread.start()

    def _verify(self) -> None:
        """Reads the lock back: the object holds our token (a second guard beside the
        server's preconditions)."""
        current = gcs_objects.stat(self.path)
        holder = self._holder(current["generation"]) if current else None
        if not holder or holder.get("token") != self.token:
            self._generation = None
            raise UserError(f"train.run_dir {self.run_dir} is in use by {_describe(holder)}; "
                            f"lock object {self.path}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self._generation = gcs_objects.write(self.path, self._record(),
                                             if_generation=self._generation)
            except FileExistsError:
                current = gcs_objects.stat(self.path)
                holder = self._holder(current["generation"]) if current else None
                self.lost = (f"train.run_dir {self.run_dir}: this run lost its lock to "
                             f"{_describe(holder)} (no heartbeat reached GCS within the lease)")
                return
            except Exception as err:  # noqa: BLE001 - a network blip: retry at the next beat
                self.log(f"run_dir lock heartbeat failed ({one_line(err)}); retrying")

    def check(self) -> None:
        """Raises UserError once another trainer has taken the lock over (this one then must
        not write the run's files any more)."""
        if self.lost:
            raise UserError(self.lost)

    def release(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._generation is not None and not self.lost:
            gcs_objects.delete(self.path, if_generation=self._generation)
        self._generation = None

    def __enter__(self) -> "GcsRunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
