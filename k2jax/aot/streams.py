"""The two streams of one computation's walk in the step-time model (k2jax/aot/step_time.py):
the compute stream's clock, the collective stream, the host DMA stream of offloaded remat and
what is in flight on them; and the bytes an async host <-> HBM transfer moves."""

from __future__ import annotations

import dataclasses
from typing import Any

from k2jax.aot.hlo_text import Computation, Instruction


@dataclasses.dataclass
class Streams:
    """The two streams of one computation's walk: the compute clock, when the collective
    stream is free, and the collectives in flight."""

    total: Any  # the StepTime being summed
    chain_last: dict  # fused collective -> index of the last op carrying it
    clock: float = 0.0
    comm_free: float = 0.0
    pending: dict = dataclasses.field(default_factory=dict)  # async start / rendezvous -> end
    chain_finish: dict = dataclasses.field(default_factory=dict)  # fused collective -> end
    host_free: float = 0.0  # the host DMA stream
    host_pending: dict = dataclasses.field(default_factory=dict)  # transfer start -> end

    def issue(self, seconds: float) -> float:
        """Queue a collective of `seconds` on the collective stream now; returns its end."""
        self.total.collective_seconds += seconds
        self.total.collectives += 1
        self.comm_free = max(self.clock, self.comm_free) + seconds
        return self.comm_free

    def wait(self, finish: float) -> None:
        """The compute stream waits for a collective finishing at `finish`."""
        if finish > self.clock:
            self.total.exposed_collective_seconds += finish - self.clock
            self.clock = finish


_HOST_TRANSFERS = ("dynamic-update-slice-start", "dynamic-slice-start", "copy-start")


def host_transfer_bytes(instr: Instruction, comp: Computation) -> float:
    """Bytes an async start moves between HBM and host memory (0 for anything else): the
    update written into a host buffer, the slice read out of one, or a whole copy."""
    if instr.opcode not in _HOST_TRANSFERS or not any(a.host for a in instr.shape):
        return 0.0
    if instr.opcode == "dynamic-update-slice-start" and len(instr.operands) > 1:
        update = comp.by_name.get(instr.operands[1])
        return update.result_bytes if update is not None else 0.0
    if instr.opcode == "dynamic-slice-start":
        sliced = [a for a in instr.shape if a.dims and not a.host]
        return sliced[-1].bytes if sliced else 0.0
    return instr.shape[0].bytes
