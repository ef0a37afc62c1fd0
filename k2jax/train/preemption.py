"""SIGTERM (a TPU preemption notice) or Ctrl-C, whenever it comes: exit 0 with one line.

Before the first step (imports, state set-up, restore, compile: minutes for K2) there is
nothing new to checkpoint, so the handler raises StoppedBeforeFirstStep at once: the `with`
blocks on the way out release the run_dir lock and close the checkpoint manager, and the
command prints one line. Everything start-up writes is atomic, so nothing is left half-written.
From the first step on, the handler only sets a flag: the step finishes, is checkpointed, and
the run exits 0, with every host stopping at the SAME step.

A notice reaches one host, or all hosts at different moments. Acting on a per-host flag let one
host stop and checkpoint while the others stepped on: a hang in the next collective or a
checkpoint torn between steps. So after each step the hosts agree: a one-element all-gather of
the local flags (jax's multihost_utils), and every host stops when any host was asked to. The
hosts already meet in the step's own collectives, so the agreement adds no new waiting point,
only one tiny collective per step (microseconds next to a K2 step of seconds).

Python runs a signal handler between bytecodes of the main thread only: a signal that comes
inside one long native call (an XLA compile, a restore's reads) is acted on when that call
returns. XLA's state after a compile interrupted that way can crash the interpreter's own
teardown, so the command ends the process with os._exit(0) once the lock is released.

Why not jax's preemption sync manager (Orbax's `reached_preemption`): it sees SIGTERM through a
C++ handler that any Python SIGTERM handler replaces, and it does not cover Ctrl-C.
"""

from __future__ import annotations

import signal

import jax
import numpy as np


class StoppedBeforeFirstStep(BaseException):
    """A stop signal during start-up. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (a library's retry, a restore fallback) takes it for a
    failure to handle."""


class StopRequested:
    """Installs SIGTERM/SIGINT handlers: during start-up they raise StoppedBeforeFirstStep,
    after `steps_started()` they set a flag, and `agreed()` is the cross-host decision."""

    def __init__(self):
        self.requested = False
        self.in_steps = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        first = not self.requested
        self.requested = True
        if first and not self.in_steps:  # once: a second notice must not interrupt the exit
            raise StoppedBeforeFirstStep(f"stopped by {signal.Signals(signum).name} during "
                                         "start-up, before the first step: nothing new to "
                                         "checkpoint")

    def take_back(self) -> None:
        """Installs the handlers again: jax.distributed.initialize (its preemption notifier)
        sets a C++ SIGTERM handler of its own over them, which neither stops nor tells Python."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def steps_started(self) -> None:
        """From now on a signal finishes the step and checkpoints it."""
        self.take_back()  # whatever start-up installed since
        self.in_steps = True

    def agreed(self) -> bool:
        """True on every process, at the same call, once any process was asked to stop.
        Every process must call it once per step (it is a collective when there are several)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
