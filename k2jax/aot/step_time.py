"""Predicted step time of a compiled TPU step, from its optimized HLO (`compiled.as_text()`).

The model, op by op in XLA's schedule order (the text of a scheduled module is in schedule
order), one compute stream and one collective stream per chip:

- Compute ops (fusions, dots, convolutions, Pallas kernels, unfused data movement) take
  max(FLOPs / peak, bytes / HBM bandwidth). FLOPs are counted from the shapes of the dots and
  convolutions inside a fusion (2 per multiply-add); bytes are what the op reads and writes in HBM:
  its operands and result, except that an operand only dynamic-sliced inside the fusion counts
  for the slice, and the buffer a dynamic-update-slice writes in place counts for the update.
  An op whose FLOP time is the larger is "compute", the others "memory".
- Attention kernels (splash, k2jax's flash; opaque custom calls) count 4 (forward), 6 (dq),
  8 (dk/dv) or 10 (fused backward) x batch.heads x Sq x Sk x head_dim FLOPs, times the fraction
  of causal blocks they visit (from their block sizes when the kernel records them, else 1/2).
- Collectives cost their bytes over the ICI bandwidth of the physical torus axes their replica
  groups span (k2jax/aot/collectives.py: ring algorithms, wrap-around, DCN between slices).
- Overlap rule: an asynchronous collective (`*-start` ... `*-done`, `async-start` ... `async-done`)
  runs on the collective stream from its start, while the compute stream runs the ops scheduled
  between; its `done` waits for what is left. A synchronous collective stalls the compute
  stream for its whole duration. Collectives run one at a time on the collective stream.
  Exposed communication = the stalls.
- Loops (`while`: the scan over layers, the micro-batch loop) cost their body times the trip
  count (from the loop's known_trip_count, else from its condition `i < N`).

predicted step = compute + memory + exposed communication; predicted MFU = model FLOPs per step
/ (predicted step x chips x peak).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from k2jax.aot.chips import Chip
from k2jax.aot.collectives import DeviceLayout, collective_seconds, megascale_seconds
from k2jax.aot.hlo_text import Computation, Instruction, Module, parse_module

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# No HBM traffic of their own (views, bookkeeping) or hidden behind compute (copy-start/done:
# memory-space prefetches XLA overlaps).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
        "replica-id", "after-all", "copy-start", "copy-done", "opt-barrier", "add-dependency",
        "domain", "iota", "send-done", "recv-done", "get-dimension-size", "rng-get-and-update-state"}
_SLICERS = {"dynamic-slice", "slice", "gather"}
_VIEWS = {"bitcast", "reshape", "copy"}


@dataclasses.dataclass
class StepTime:
    """Seconds per chip of one execution of a computation (the whole step for the entry)."""

    compute_seconds: float = 0.0  # ops whose FLOP time is the larger
    memory_seconds: float = 0.0  # ops whose HBM time is the larger
    exposed_collective_seconds: float = 0.0  # compute-stream stalls on collectives
    collective_seconds: float = 0.0  # all collective time, hidden or not
    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: int = 0  # collective ops executed (loops counted by trips)
    unknown_trip_counts: int = 0

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.memory_seconds + self.exposed_collective_seconds

    def add(self, other: "StepTime", times: float = 1.0) -> None:
        for field in dataclasses.fields(self):
            value = getattr(other, field.name)
            if field.name == "unknown_trip_counts":
                setattr(self, field.name, getattr(self, field.name) + value)
            else:
                setattr(self, field.name, getattr(self, field.name) + times * value)


def _dims_attr(instr: Instruction, key: str) -> list[int]:
    text = instr.attr(key) or ""
    return [int(x) for x in re.findall(r"\d+", text)]


def dot_flops(instr: Instruction, comp: Computation) -> float:
    """2 x output elements x contracted elements of a dot or convolution."""
    out = sum(a.elements for a in instr.shape)
    if instr.opcode == "dot":
        lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
        if lhs is None or not lhs.shape:
            return 0.0
        contracted = math.prod(lhs.shape[0].dims[i] for i in _dims_attr(instr, "lhs_contracting_dims"))
        return 2.0 * out * contracted
    # convolution: each output element sums over the kernel's input features times, per
    # spatial dimension, the window positions that land on the input (XLA writes windowed
    # einsums as convolutions whose window mostly covers padding: size 16 over an input of 1).
    lhs = comp.by_name.get(instr.operands[0]) if instr.operands else None
    rhs = comp.by_name.get(instr.operands[1]) if len(instr.operands) > 1 else None
    labels = re.match(r"([^_]*)_([^-]*)->", instr.attr("dim_labels") or "")
    if lhs is None or rhs is None or not lhs.shape or not rhs.shape or not labels \
            or "i" not in labels.group(2):
        return 0.0
    lhs_labels, rhs_labels = labels.groups()
    lhs_dims, kernel = lhs.shape[0].dims, rhs.shape[0].dims
    macs = kernel[rhs_labels.index("i")]
    for pos, label in enumerate(rhs_labels):
        if label.isdigit() and label in lhs_labels:
            macs *= min(kernel[pos], lhs_dims[lhs_labels.index(label)])
    return 2.0 * out * macs


_ATTENTION = re.compile(r"(splash|flash|mha|attention)", re.IGNORECASE)


def _causal_fraction(rest: str, kind: str, seq_q: int, seq_k: int) -> float:
    """Fraction of (q block, kv block) pairs a causal kernel visits, from its recorded block
    sizes (splash's kernel metadata), else 1/2."""
    suffix = {"fwd": "", "dq": "_dq", "dkv": "_dkv", "bwd": "_dkv"}[kind]
    bq = re.search(r'block_q' + suffix + r'\\?"?:\s*(\d+)', rest)
    bk = re.search(r'block_kv' + suffix + r'\\?"?:\s*(\d+)', rest)
    if not bq or not bk:
        return 0.5
    bq, bk = int(bq.group(1)), int(bk.group(1))
    nq, nk = max(seq_q // bq, 1), max(seq_k // bk, 1)
    visited = sum(min(nk, ((i + 1) * bq - 1) // bk + 1) for i in range(nq))
    return visited / (nq * nk)


def attention_kernel_flops(instr: Instruction, comp: Computation) -> float:
    """FLOPs of an attention Pallas kernel (an opaque custom call), from its q, k shapes."""
    where = instr.op_name + " " + instr.name
    if not _ATTENTION.search(where):
        return 0.0
    arrays = []
    for name in instr.operands:
        op = comp.by_name.get(name)
        if op is not None and len(op.shape) == 1 and len(op.shape[0].dims) >= 3 \
                and op.shape[0].dtype in ("bf16", "f32", "f16"):
            arrays.append(op.shape[0])
    if len(arrays) < 2:
        return 0.0
    q, k = arrays[0], arrays[1]
    lowered = where.lower()
    if "dkv" in lowered:
        kind, units = "dkv", 8
    elif "dq" in lowered:
        kind, units = "dq", 6
    elif "bwd" in lowered:
        kind, units = "bwd", 10
    else:
        kind, units = "fwd", 4
    seq_q, seq_k, head_dim = q.dims[-2], k.dims[-2], q.dims[-1]
    rows = math.prod(q.dims[:-1])
    return units * rows * seq_k * head_dim * _causal_fraction(instr.rest, kind, seq_q, seq_k)


class StepTimeModel:
    """Walks a parsed module for one chip of `layout` with the figures of `chip`."""

    def __init__(self, module: Module, chip: Chip, layout: DeviceLayout,
                 layer_trips: Optional[tuple[int, int]] = None):
        """`layer_trips=(compiled, full)`: loops of `compiled` trips (the scan over a reduced
        layer count) are costed at `full` trips, extrapolating per layer from a cheaper
        compile. `extrapolated_loops` names the loops so costed: a scanned step has two (the
        forward and the backward scan); fewer means XLA unrolled one, whose layers then count
        only `compiled` times."""
        self.module, self.chip, self.layer_trips = module, chip, layer_trips
        self.layout = layout
        self.extrapolated_loops: set[str] = set()
        self._memo: dict[str, StepTime] = {}
        self._fusion_memo: dict[str, tuple[float, list[Optional[float]], Optional[float]]] = {}

    # --- compute ops -------------------------------------------------------------------
    def _fused(self, name: str) -> tuple[float, list[Optional[float]], Optional[float]]:
        """(FLOPs, per-parameter bytes actually read or None for all, result bytes or None
        for all) of a fused computation."""
        if name in self._fusion_memo:
            return self._fusion_memo[name]
        comp = self.module[name]
        flops = 0.0
        users: dict[str, list[Instruction]] = {}
        for instr in comp.instructions:
            for op in instr.operands:
                users.setdefault(op, []).append(instr)
            if instr.opcode in ("dot", "convolution"):
                flops += dot_flops(instr, comp)
            elif instr.opcode == "fusion" and instr.called("calls"):
                flops += self._fused(instr.called("calls"))[0]
        params = sorted((i for i in comp.instructions if i.opcode == "parameter"),
                        key=_param_index)
        root = comp.root
        in_place = set()
        written: Optional[float] = None
        roots = ([comp.by_name[o] for o in root.operands if o in comp.by_name]
                 if root.opcode == "tuple" else [root])
        if any(r.opcode == "dynamic-update-slice" for r in roots):
            written = 0.0
            for r in roots:
                if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
                    in_place.add(_through_views(comp, r.operands[0]))
                    update = comp.by_name.get(r.operands[1])
                    written += update.result_bytes if update is not None else 0.0
                else:
                    written += r.result_bytes
        read: list[Optional[float]] = []
        for param in params:
            if param.name in in_place:
                read.append(0.0)
                continue
            read.append(_sliced_bytes(param.name, users))
        result = (flops, read, written)
        self._fusion_memo[name] = result
        return result

    def _operand_bytes(self, instr: Instruction, comp: Computation) -> list[float]:
        out = []
        for name in instr.operands:
            op = comp.by_name.get(name)
            out.append(op.result_bytes if op is not None else 0.0)
        return out

    def _op_cost(self, instr: Instruction, comp: Computation) -> tuple[float, float]:
        """(FLOPs, HBM bytes) of one compute op."""
        operand_bytes = self._operand_bytes(instr, comp)
        if instr.opcode == "fusion" and instr.called("calls") in self.module.computations:
            flops, read, written = self._fused(instr.called("calls"))
            total = sum(b if r is None else min(r, b)
                        for b, r in zip(operand_bytes, read + [None] * len(operand_bytes)))
            return flops, total + (instr.result_bytes if written is None else written)
        if instr.opcode in ("dot", "convolution"):
            return dot_flops(instr, comp), sum(operand_bytes) + instr.result_bytes
        if instr.opcode == "custom-call":
            flops = attention_kernel_flops(instr, comp)
            if "AllocateBuffer" in instr.rest or "AssumeGatherIndicesInBound" in instr.rest:
                return 0.0, 0.0
            return flops, sum(operand_bytes) + instr.result_bytes
        if instr.opcode == "dynamic-update-slice":
            update = operand_bytes[1] if len(operand_bytes) > 1 else 0.0
            return 0.0, 2 * update
        if instr.opcode in _SLICERS:
            return 0.0, 2 * instr.result_bytes
        return 0.0, sum(operand_bytes) + instr.result_bytes

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
            operand_bytes = sum(self._operand_bytes(instr, comp))
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

    # --- control flow ------------------------------------------------------------------
    def _trip_count(self, instr: Instruction, parent: Computation) -> Optional[int]:
        """Trips of a while loop: its known_trip_count, else from `i < N` in its condition,
        the step `i + c` in its body and i's initial value (0 unless a constant)."""
        known = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instr.rest)
        if known:
            return int(known.group(1))
        cond = self.module.computations.get(instr.called("condition") or "")
        if cond is None:
            return None
        root = cond.root
        if root.opcode != "compare" or "direction=LT" not in root.rest or len(root.operands) != 2:
            return None
        counter, limit = (cond.by_name.get(o) for o in root.operands)
        if limit is None or limit.opcode != "constant" or not _is_int(limit.operand_text):
            return None
        end = int(limit.operand_text)
        index = _tuple_index(counter)
        begin, step = 0, 1
        if index is not None:
            body = self.module.computations.get(instr.called("body") or "")
            update = _tuple_element(body, body.root, index) if body else None
            if update is not None and update.opcode == "add":
                steps = [_constant_value(body, o) for o in update.operands]
                steps = [v for v in steps if v is not None]
                step = steps[0] if steps and steps[0] > 0 else 1
            init = (_tuple_element(parent, parent.by_name.get(instr.operands[0]), index)
                    if instr.operands else None)
            value = _constant_value(parent, init.name) if init is not None else None
            begin = value if value is not None else 0
        return max(0, -(-(end - begin) // step))

    def computation(self, name: str) -> StepTime:
        """StepTime of one execution of computation `name`."""
        if name in self._memo:
            return self._memo[name]
        comp = self.module[name]
        total = StepTime()
        clock = 0.0  # compute stream
        comm_free = 0.0  # collective stream
        pending: dict[str, float] = {}
        for instr in comp.instructions:
            op = instr.opcode
            megascale = _MEGASCALE.search(instr.rest) if op in ("send", "recv") else None
            if megascale and op == "send":
                # Multi-slice: the DCN stage of a collective is a send/recv pair run by the
                # Megascale runtime; it overlaps compute until the recv-done of its rendezvous.
                seconds = megascale_seconds(megascale.group(1),
                                            self._operand_bytes(instr, comp)[0],
                                            self.chip, self.layout)
                total.collective_seconds += seconds
                total.collectives += 1
                comm_free = max(clock, comm_free) + seconds
                pending[_rendezvous(instr)] = comm_free
                continue
            if megascale:  # its recv: the transfer's time is on the send
                continue
            if op == "recv-done" and instr.operands and instr.operands[0] in comp.by_name:
                key = _rendezvous(comp.by_name[instr.operands[0]])
                clock = _wait(total, clock, pending.pop(key, clock))
                continue
            if op in FREE:
                continue
            if op.endswith("-done") and op != "copy-done":
                finish = pending.pop(instr.operands[0] if instr.operands else "", clock)
                clock = _wait(total, clock, finish)
                continue
            coll = self._collective(instr, comp)
            if coll is not None:
                seconds = self._collective_seconds(instr, coll, comp)
                total.collective_seconds += seconds
                total.collectives += 1
                begin = max(clock, comm_free)
                comm_free = begin + seconds
                if op.endswith("-start"):
                    pending[instr.name] = comm_free
                else:  # synchronous: the compute stream waits
                    total.exposed_collective_seconds += comm_free - clock
                    clock = comm_free
                continue
            sub = self._control(instr, comp)
            if sub is not None:
                body, times = sub
                total.add(body, times)
                clock += body.seconds * times
                continue
            flops, nbytes = self._op_cost(instr, comp)
            flop_s, byte_s = flops / self.chip.peak_flops, nbytes / self.chip.hbm_bandwidth
            if flop_s >= byte_s and flops > 0:
                total.compute_seconds += flop_s
            else:
                total.memory_seconds += byte_s
            total.flops += flops
            total.hbm_bytes += nbytes
            clock += max(flop_s, byte_s)
        # Anything still in flight at the end of the computation is waited for.
        end = max([clock, *pending.values()])
        total.exposed_collective_seconds += end - clock
        self._memo[name] = total
        return total

    def _control(self, instr: Instruction, parent: Computation
                 ) -> Optional[tuple[StepTime, float]]:
        """(cost of the called computation(s), times) for while/call/conditional/async ops."""
        op = instr.opcode
        if op == "while":
            trips = self._trip_count(instr, parent)
            body = StepTime()
            body.add(self.computation(instr.called("body")))
            if trips is None:
                body.unknown_trip_counts += 1
                trips = 1
            elif self.layer_trips and trips == self.layer_trips[0]:
                trips = self.layer_trips[1]
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

    def step(self) -> StepTime:
        return self.computation(self.module.entry)


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _rendezvous(instr: Instruction) -> str:
    """The key a Megascale send and its recv share (the collective they carry out)."""
    found = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', instr.rest)
    return "megascale:" + (found.group(1) if found else instr.name)


def _wait(total: StepTime, clock: float, finish: float) -> float:
    """The compute stream waits for a collective finishing at `finish`; returns the clock."""
    if finish > clock:
        total.exposed_collective_seconds += finish - clock
        return finish
    return clock


def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


def _constant_value(comp: Computation, name: str) -> Optional[int]:
    op = comp.by_name.get(name)
    if op is not None and op.opcode == "constant" and _is_int(op.operand_text):
        return int(op.operand_text)
    return None


def _tuple_index(instr: Optional[Instruction]) -> Optional[int]:
    if instr is None or instr.opcode != "get-tuple-element":
        return None
    index = instr.attr("index")
    return int(index) if index and index.isdigit() else None


def _tuple_element(comp: Computation, tup: Optional[Instruction], index: int
                   ) -> Optional[Instruction]:
    if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
        return None
    return comp.by_name.get(tup.operands[index])


def _param_index(instr: Instruction) -> int:
    return int(instr.operand_text) if instr.operand_text.isdigit() else 0


def _through_views(comp: Computation, name: str) -> str:
    """The parameter (or op) a value is a bitcast/reshape view of."""
    seen = 0
    while name in comp.by_name and comp.by_name[name].opcode in _VIEWS and seen < 8:
        operands = comp.by_name[name].operands
        if not operands:
            break
        name, seen = operands[0], seen + 1
    return name


def _sliced_bytes(name: str, users: dict[str, list[Instruction]]) -> Optional[float]:
    """Bytes read of a fusion parameter that is only sliced (through views), else None."""
    total = 0.0
    for user in users.get(name, []):
        if user.opcode in _SLICERS and user.operands and user.operands[0] == name:
            total += user.result_bytes
        elif user.opcode in ("bitcast", "reshape"):
            inner = _sliced_bytes(user.name, users)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total if users.get(name) else None


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
