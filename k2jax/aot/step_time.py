"""Predicted step time of a compiled TPU step, from its optimized HLO (`compiled.as_text()`).

The model, op by op in XLA's schedule order (the text of a scheduled module is in schedule
order), one compute stream and one collective stream per chip:

- Compute ops take max(MXU FLOPs / (peak x MXU efficiency), bytes / HBM bandwidth)
  (k2jax/aot/op_cost.py counts both; MXU FLOPs pad each matmul to the array's side, 128 or
  256 on v6e; the chip's stated MXU efficiency and side are in chips.py). An op
  whose FLOP time is the larger is "compute", the others "memory".
- Attention kernels (splash, k2jax's flash; opaque custom calls) count 4 (forward), 6 (dq),
  8 (dk/dv) or 10 (fused backward) x batch.heads x Sq x Sk x head_dim FLOPs, times the fraction
  of causal blocks they visit.
- Collectives cost their bytes over the ICI bandwidth of the physical torus axes their replica
  groups span (k2jax/aot/collectives.py: ring algorithms, wrap-around, DCN between slices).
- Overlap rule: an asynchronous collective (`*-start` ... `*-done`, `async-start` ... `async-done`)
  runs on the collective stream from its start, while the compute stream runs the ops scheduled
  between; its `done` waits for what is left. A collective inside fusions (XLA's async collective
  fusion, from the flags MaxText's runs set: one collective, by channel id, carried through a
  chain of fusions) starts with the first fusion of its chain and is waited for at the end of
  the last, so it overlaps the chain's own compute and everything scheduled in between. A
  synchronous collective stalls the compute stream for its whole duration. XLA's
  all-reduce-scatter fusion (an all-reduce each device dynamic-slices) is a reduce-scatter.
  Collectives run one at a time on the collective stream. Exposed communication = the stalls.
- Loops cost their body times the trip count (k2jax/aot/loop_trips.py).

predicted step = compute + memory + exposed communication; predicted MFU = model FLOPs per step
/ (predicted step x chips x peak).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from k2jax.aot.chips import Chip
from k2jax.aot.collectives import DeviceLayout, collective_seconds, megascale_seconds
from k2jax.aot.hlo_text import Computation, Instruction, Module, parse_module
from k2jax.aot.loop_trips import trip_count
from k2jax.aot.op_cost import COLLECTIVES, OpCosts
from k2jax.aot.streams import Streams, host_transfer_bytes

# No HBM traffic of their own (views, bookkeeping) or hidden behind compute (copy-start/done:
# memory-space prefetches XLA overlaps).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
        "replica-id", "after-all", "copy-start", "copy-done", "opt-barrier", "add-dependency",
        "domain", "iota", "send-done", "recv-done", "get-dimension-size", "rng-get-and-update-state"}


@dataclasses.dataclass
class StepTime:
    """Seconds per chip of one execution of a computation (the whole step for the entry)."""

    compute_seconds: float = 0.0  # ops whose FLOP time is the larger
    memory_seconds: float = 0.0  # ops whose HBM time is the larger
    exposed_collective_seconds: float = 0.0  # compute-stream stalls on collectives
    exposed_host_seconds: float = 0.0  # compute-stream stalls on host <-> HBM transfers
    host_transfer_seconds: float = 0.0  # all host <-> HBM transfer time (offloaded remat)
    collective_seconds: float = 0.0  # all collective time, hidden or not
    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: int = 0  # collective ops executed (loops counted by trips)
    unknown_trip_counts: int = 0

    @property
    def seconds(self) -> float:
        return (self.compute_seconds + self.memory_seconds + self.exposed_collective_seconds
                + self.exposed_host_seconds)

    def add(self, other: "StepTime", times: float = 1.0) -> None:
        for field in dataclasses.fields(self):
            value = getattr(other, field.name)
            if field.name == "unknown_trip_counts":
                setattr(self, field.name, getattr(self, field.name) + value)
            else:
                setattr(self, field.name, getattr(self, field.name) + times * value)


class StepTimeModel:
    """Walks a parsed module for one chip of `layout` with the figures of `chip`."""

    def __init__(self, module: Module, chip: Chip, layout: DeviceLayout,
                 layer_trips: Optional[tuple[int, int]] = None):
        """`layer_trips=(compiled, full)`: loops of `compiled` trips (the scan over a reduced
        layer count) are costed at `full` trips, extrapolating per layer from a cheaper
        compile; a layer scan with one or two iterations peeled out of its loop, at `full`
        less that many. `extrapolated_loops` names the loops so costed: a scanned step has two
        (the forward and the backward scan); fewer means XLA unrolled one, whose layers then
        count only `compiled` times."""
        self.module, self.chip, self.layer_trips = module, chip, layer_trips
        self.layout = layout
        self.costs = OpCosts(module, chip.mxu_side)
        self.extrapolated_loops: set[str] = set()
        self._layer_loop_depth = 0  # > 0 while costing a layer loop's body
        self._memo: dict[str, StepTime] = {}

    # --- collectives -------------------------------------------------------------------
    def _collective(self, instr: Instruction, comp: Computation) -> Optional[Instruction]:
        """The collective an instruction runs (itself, or the one an async-start wraps)."""
        base = instr.opcode.removesuffix("-start")
        if base in COLLECTIVES:
            return instr
        if instr.opcode == "async-start":
            called = instr.called("calls")
            if called in self.module.computations:
                for inner in self.module[called].instructions:
                    if inner.opcode in COLLECTIVES:
                        return inner
        return None

    def _collective_seconds(self, instr: Instruction, coll: Instruction,
                            comp: Computation) -> float:
        kind = coll.opcode.removesuffix("-start")
        if coll is instr:
            operand_bytes = sum(self.costs.operand_bytes(instr, comp))
        else:  # inside an async computation: its parameters are the operands
            called = self.module[instr.called("calls")]
            operand_bytes = sum(called.by_name[o].result_bytes for o in coll.operands
                                if o in called.by_name)
        # An all-gather-start or collective-permute-start result is (operands, outputs[,
        # u32 contexts]): the output is the second half. An all-reduce-start's is the output.
        out_bytes = coll.result_bytes
        if kind in ("all-gather", "collective-permute") and coll.opcode.endswith("-start") \
                and len(coll.shape) >= 2:
            arrays = [a for a in coll.shape if a.dims or a.dtype not in ("u32", "s32")]
            out_bytes = sum(a.bytes for a in arrays[len(arrays) // 2:])
        return collective_seconds(kind, coll, operand_bytes, out_bytes, self.chip, self.layout)

    def _fused_collective_seconds(self, coll: Instruction, comp: Computation) -> float:
        kind = coll.opcode.removesuffix("-start")
        if kind == "all-reduce" and _only_sliced(coll, comp):
            # XLA's all-reduce-scatter fusion: an all-reduce of which each device keeps its
            # dynamic-slice is a reduce-scatter (the ring moves the input once, not twice).
            kind = "reduce-scatter"
        operand_bytes = sum(self.costs.operand_bytes(coll, comp))
        return collective_seconds(kind, coll, operand_bytes, coll.result_bytes, self.chip,
                                  self.layout)

    def _host_transfer(self, walk: "Streams", instr: Instruction, comp: Computation) -> bool:
        """Offloaded remat: an async DMA between HBM and host memory runs on the host stream
        from its start; its -done waits for it. True if `instr` was one of these."""
        host_bytes = host_transfer_bytes(instr, comp)
        if host_bytes:
            seconds = host_bytes / self.chip.host_bandwidth
            walk.total.host_transfer_seconds += seconds
            walk.host_free = max(walk.clock, walk.host_free) + seconds
            walk.host_pending[instr.name] = walk.host_free
            return True
        if instr.operands and instr.operands[0] in walk.host_pending:  # its -done
            finish = walk.host_pending.pop(instr.operands[0])
            if finish > walk.clock:
                walk.total.exposed_host_seconds += finish - walk.clock
                walk.clock = finish
            return True
        return False

    def _fused_chains(self, comp: Computation) -> dict[str, int]:
        """For each collective carried inside fusions (keyed by channel id): the position of
        the last op of `comp` that carries it (where the compute stream waits for it)."""
        last: dict[str, int] = {}
        for index, instr in enumerate(comp.instructions):
            for coll, _ in self.costs.fused_collectives(instr):
                last[_channel(coll)] = index
        return last

    def computation(self, name: str) -> StepTime:
        """StepTime of one execution of computation `name`."""
        if name in self._memo:
            return self._memo[name]
        comp = self.module[name]
        walk = Streams(StepTime(), self._fused_chains(comp))
        for index, instr in enumerate(comp.instructions):
            self._walk_op(walk, index, instr, comp)
        # Anything still in flight at the end of the computation is waited for.
        end = max([walk.clock, *walk.pending.values()])
        walk.total.exposed_collective_seconds += end - walk.clock
        self._memo[name] = walk.total
        return walk.total

    def _walk_op(self, walk: "Streams", index: int, instr: Instruction, comp: Computation) -> None:
        """Advance the two streams of `walk` over one instruction."""
        total, op = walk.total, instr.opcode
        megascale = _MEGASCALE.search(instr.rest) if op in ("send", "recv") else None
        if megascale and op == "send":
            # Multi-slice: the DCN stage of a collective is a send/recv pair run by the
            # Megascale runtime; it overlaps compute until the recv-done of its rendezvous.
            seconds = megascale_seconds(megascale.group(1),
                                        self.costs.operand_bytes(instr, comp)[0],
                                        self.chip, self.layout)
            walk.pending[_rendezvous(instr)] = walk.issue(seconds)
            return
        if megascale:  # its recv: the transfer's time is on the send
            return
        if op == "recv-done" and instr.operands and instr.operands[0] in comp.by_name:
            key = _rendezvous(comp.by_name[instr.operands[0]])
            walk.wait(walk.pending.pop(key, walk.clock))
            return
        if self._host_transfer(walk, instr, comp):
            return
        if op in FREE:
            return
        if op.endswith("-done") and op != "copy-done":
            walk.wait(walk.pending.pop(instr.operands[0] if instr.operands else "", walk.clock))
            return
        coll = self._collective(instr, comp)
        if coll is not None:
            finish = walk.issue(self._collective_seconds(instr, coll, comp))
            if op.endswith("-start"):
                walk.pending[instr.name] = finish
            else:  # synchronous: the compute stream waits
                walk.wait(finish)
            return
        sub = self._control(instr, comp)
        if sub is not None:
            body, times = sub
            total.add(body, times)
            walk.clock += body.seconds * times
            return
        fused = self.costs.fused_collectives(instr)
        for inner, inner_comp in fused:  # async collective fusion: starts with its chain
            key = _channel(inner)
            if key not in walk.chain_finish:
                walk.chain_finish[key] = walk.issue(self._fused_collective_seconds(inner,
                                                                                   inner_comp))
        flops, mxu_flops, nbytes = self.costs.op_cost(instr, comp)
        flop_s = mxu_flops / (self.chip.peak_flops * self.chip.mxu_efficiency)
        byte_s = nbytes / self.chip.hbm_achieved
        if flop_s >= byte_s and flops > 0:
            total.compute_seconds += flop_s
        else:
            total.memory_seconds += byte_s
        total.flops += flops
        total.hbm_bytes += nbytes
        walk.clock += max(flop_s, byte_s)
        for inner, _ in fused:  # the chain's last fusion waits for its collective
            key = _channel(inner)
            if walk.chain_last.get(key) == index and key in walk.chain_finish:
                walk.wait(walk.chain_finish.pop(key))

    def _control(self, instr: Instruction, parent: Computation
                 ) -> Optional[tuple[StepTime, float]]:
        """(cost of the called computation(s), times) for while/call/conditional/async ops."""
        op = instr.opcode
        if op == "while":
            trips = trip_count(self.module, instr, parent)
            layer_loop = (trips is not None and self.layer_trips is not None
                          and self._is_layer_loop(instr, trips))
            self._layer_loop_depth += layer_loop
            body = StepTime()
            body.add(self.computation(instr.called("body")))
            self._layer_loop_depth -= layer_loop
            if trips is None:
                body.unknown_trip_counts += 1
                trips = 1
            elif layer_loop:
                # A layer scan with k iterations peeled out of the loop (XLA's pipelining of
                # the backward scan with host offload: 3 trips of a 4-layer compile) runs
                # full - k times; the peeled layers are costed once where they are.
                trips += self.layer_trips[1] - self.layer_trips[0]
                self.extrapolated_loops.add(instr.name)
            return body, float(trips)
        if op in ("call", "async-start") and (instr.called("to_apply") or instr.called("calls")):
            return self.computation(instr.called("to_apply") or instr.called("calls")), 1.0
        if op == "conditional":
            names = re.findall(r"%([\w.\-]+)", instr.attr("branch_computations") or "")
            names += [n for n in (instr.called("true_computation"),
                                  instr.called("false_computation")) if n]
            costs = [self.computation(n) for n in names if n in self.module.computations]
            if costs:
                return max(costs, key=lambda c: c.seconds), 1.0
        return None

    def _is_layer_loop(self, instr: Instruction, trips: int) -> bool:
        """A loop, not inside another layer loop, whose body runs the scanned layer (op names
        under the scan's `while/body/.../layers/`), of the compiled layer count, or one or two
        fewer with no loop inside (a scan with iterations peeled out). Other loops of that
        count keep their trips: the chunked loss's loop over 4 chunks in a 4-layer compile,
        a windowed einsum's loop inside a layer."""
        compiled = self.layer_trips[0]
        if self._layer_loop_depth or not compiled - 2 <= trips <= compiled or trips < 1:
            return False
        body = self.module[instr.called("body")].instructions
        # Work named under the layer scan; XLA sinks constants shared with the layer into other
        # loops under the layer's name (the chunked loss's backward loop holds one).
        runs_layer = any("/while/body/" in i.op_name and "layers/" in i.op_name
                         and i.opcode not in _NO_WORK for i in body)
        if trips == compiled:
            return runs_layer
        return runs_layer and not any(i.opcode == "while" for i in body)

    def step(self) -> StepTime:
        return self.computation(self.module.entry)


_NO_WORK = ("constant", "parameter", "get-tuple-element", "tuple", "bitcast")


def _only_sliced(instr: Instruction, comp: Computation) -> bool:
    """Whether every user of `instr` in `comp` is a dynamic-slice of it."""
    users = [i for i in comp.instructions if instr.name in i.operands]
    return bool(users) and all(u.opcode == "dynamic-slice" and u.operands[0] == instr.name
                               for u in users)


def _channel(coll: Instruction) -> str:
    channel = coll.attr("channel_id")
    return f"channel:{channel}" if channel else f"op:{coll.name}"


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _rendezvous(instr: Instruction) -> str:
    """The key a Megascale send and its recv share (the collective they carry out)."""
    found = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', instr.rest)
    return "megascale:" + (found.group(1) if found else instr.name)


def predict(hlo_text: str, chip: Chip, layout: DeviceLayout, model_flops_per_step: float,
            chips: int, layer_trips: Optional[tuple[int, int]] = None) -> dict:
    """The step-time keys `k2jax aot --json` reports, from a compiled step's HLO text.
    Seconds are per step (every chip runs the same program); MFU uses `model_flops_per_step`
    (all chips) over `chips` x the chip's peak."""
    model = StepTimeModel(parse_module(hlo_text), chip, layout, layer_trips)
    step = model.step()
    seconds = step.seconds
    extrapolated = ({"extrapolated_layer_loops": len(model.extrapolated_loops)}
                    if layer_trips else {})
    return {
        **extrapolated,
        "predicted_step_seconds": seconds,
        "predicted_mfu": model_flops_per_step / (seconds * chips * chip.peak_flops)
        if seconds > 0 else None,
        "compute_seconds": step.compute_seconds,
        "memory_seconds": step.memory_seconds,
        "exposed_collective_seconds": step.exposed_collective_seconds,
        "host_transfer_seconds": step.host_transfer_seconds,
        "exposed_host_transfer_seconds": step.exposed_host_seconds,
        "collective_seconds": step.collective_seconds,
        "hlo_flops_per_chip": step.flops,
        "hlo_hbm_bytes_per_chip": step.hbm_bytes,
        "collectives_per_step": step.collectives,
        "unknown_trip_counts": step.unknown_trip_counts,
    }


def predict_compiled(compiled, mesh, generation: str, model_flops_per_step: float) -> dict:
    """`predict` for a compiled step over `mesh` (its flattened devices are the program's
    device ids) on chips of `generation`."""
    from k2jax.aot.chips import chip_for

    devices = list(mesh.devices.flat)
    return predict(compiled.as_text(), chip_for(generation), DeviceLayout.from_devices(devices),
                   model_flops_per_step, len(devices))
