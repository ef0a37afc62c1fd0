"""FLOPs and HBM bytes of one compute op of an optimized HLO module (a fusion, dot,
convolution, Pallas kernel or unfused data movement), and the collectives a fusion runs inside
itself (async collective fusion): what the step-time walk (k2jax/aot/step_time.py) charges per op.

FLOPs are counted from the shapes of the dots and convolutions inside a fusion (2 per
multiply-add). MXU FLOPs are the same work as the systolic array does it: a dimension the array
holds (the contraction, the stationary operand's width) is padded up to a multiple of the
array's side, 128 or 256 (v6e), so a head_dim of 128 fills half a v6e array. Bytes are what the
op reads and writes in HBM: its operands and result, except that an operand only sliced
inside the fusion (also inside a fusion nested in it) counts for the slice, and the buffer a
dynamic-update-slice writes in place counts for the update.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from k2jax.aot.hlo_text import Computation, Instruction, Module

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_SLICERS = {"dynamic-slice", "slice", "gather"}
_VIEWS = {"bitcast", "reshape", "copy"}


@dataclasses.dataclass(frozen=True)
class FusedCost:
    flops: float
    mxu_flops: float  # flops as the MXU runs them (padded to its side; see mxu_fill)
    read: list  # per parameter: bytes actually read, or None for all of it
    written: Optional[float]  # bytes written, or None for the whole result
    collectives: tuple  # (instruction, computation) of each collective inside, nested too


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
        contracted = math.prod(lhs.shape[0].dims[i]
                               for i in _dims_attr(instr, "lhs_contracting_dims"))
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


def _filled(size: int, side: int) -> float:
    """Fraction of the array's `side` a dimension of `size` fills, over all its tiles."""
    return size / (math.ceil(size / side) * side) if size > 0 else 1.0


def mxu_fill(instr: Instruction, comp: Computation, side: int) -> float:
    """Fraction of an MXU of `side` x `side` a dot keeps busy. The array holds a tile of the
    stationary operand (contraction x width) while the other operand's rows stream through, so
    the contraction and the stationary operand's width are padded to multiples of `side`. XLA
    may make either operand the stationary one: the wider one is assumed. Convolutions
    (XLA's windowed einsums, whose dims are a dot's) count as filled."""
    if instr.opcode != "dot" or len(instr.operands) < 2:
        return 1.0
    lhs, rhs = (comp.by_name.get(name) for name in instr.operands[:2])
    if lhs is None or rhs is None or not lhs.shape or not rhs.shape:
        return 1.0

    def free_and_contracted(array, side_name: str) -> tuple[int, int]:
        dims = array.shape[0].dims
        contracted = set(_dims_attr(instr, f"{side_name}_contracting_dims"))
        batch = set(_dims_attr(instr, f"{side_name}_batch_dims"))
        free = math.prod(d for i, d in enumerate(dims) if i not in contracted | batch)
        return free, math.prod(dims[i] for i in contracted)

    lhs_free, contracted = free_and_contracted(lhs, "lhs")
    rhs_free, _ = free_and_contracted(rhs, "rhs")
    return _filled(contracted, side) * max(_filled(lhs_free, side), _filled(rhs_free, side))


def attention_mxu_fill(instr: Instruction, comp: Computation, side: int) -> float:
    """Every matmul of an attention kernel has head_dim as its contraction (q.k, do.v) or as
    the width of its stationary operand (p.v, ds.k, ds.q): the kernel fills head_dim / side
    of each tile (half a v6e array at head_dim 128)."""
    arrays = _attention_arrays(instr, comp)
    return _filled(arrays[0].dims[-1], side) if len(arrays) >= 2 else 1.0


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
    arrays = _attention_arrays(instr, comp)
    if len(arrays) < 2:
        return 0.0
    q, k = arrays[0], arrays[1]
    lowered = (instr.op_name + " " + instr.name).lower()
    if "dkv" in lowered and _writes_dq(instr, q, k):
        # splash's fused backward (use_fused_bwd_kernel) is its dkv kernel that also writes
        # dq (as partial sums per kv block, reduced after): dq, dk and dv in one pass.
        kind, units = "bwd", 10
    elif "dkv" in lowered:
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


def _attention_arrays(instr: Instruction, comp: Computation) -> list:
    """The array operands (q, k, v, ...) of an attention kernel; [] for any other op."""
    if not _ATTENTION.search(instr.op_name + " " + instr.name):
        return []
    arrays = []
    for name in instr.operands:
        op = comp.by_name.get(name)
        if op is not None and len(op.shape) == 1 and len(op.shape[0].dims) >= 3 \
                and op.shape[0].dtype in ("bf16", "f32", "f16"):
            arrays.append(op.shape[0])
    return arrays


def _writes_dq(instr: Instruction, q, k) -> bool:
    """Whether a backward kernel writes dq beside dk and dv: three results shaped like q or k
    (heads, S, D; splash's fused backward adds a kv-block axis in front of dq), not two."""
    shapes = {tuple(q.dims[-3:]), tuple(k.dims[-3:])}
    return sum(len(a.dims) >= 3 and tuple(a.dims[-3:]) in shapes for a in instr.shape) >= 3


class OpCosts:
    """Per-op FLOPs and bytes of one module (fusions memoized by name), for a chip whose MXU
    is `mxu_side` x `mxu_side`."""

    def __init__(self, module: Module, mxu_side: int = 128):
        self.module, self.mxu_side = module, mxu_side
        self._memo: dict[str, FusedCost] = {}

    def fused(self, name: str) -> FusedCost:
        """FLOPs, bytes read per parameter, bytes written and collectives of a fused
        computation."""
        if name in self._memo:
            return self._memo[name]
        comp = self.module[name]
        flops, mxu_flops, collectives = 0.0, 0.0, []
        users: dict[str, list[Instruction]] = {}
        for instr in comp.instructions:
            for op in instr.operands:
                users.setdefault(op, []).append(instr)
            if instr.opcode in ("dot", "convolution"):
                dot = dot_flops(instr, comp)
                flops += dot
                mxu_flops += dot / mxu_fill(instr, comp, self.mxu_side)
            elif instr.opcode in COLLECTIVES:
                collectives.append((instr, comp))
            elif instr.opcode == "fusion" and instr.called("calls") in self.module.computations:
                inner = self.fused(instr.called("calls"))
                flops += inner.flops
                mxu_flops += inner.mxu_flops
                collectives.extend(inner.collectives)
        params = sorted((i for i in comp.instructions if i.opcode == "parameter"),
                        key=_param_index)
        in_place, written = self._in_place_writes(comp)
        read = [0.0 if p.name in in_place else self._sliced_bytes(p.name, users)
                for p in params]
        result = FusedCost(flops, mxu_flops, read, written, tuple(collectives))
        self._memo[name] = result
        return result

    @staticmethod
    def _in_place_writes(comp: Computation) -> tuple[set, Optional[float]]:
        """(buffers a root dynamic-update-slice writes in place, bytes written or None)."""
        root = comp.root
        roots = ([comp.by_name[o] for o in root.operands if o in comp.by_name]
                 if root.opcode == "tuple" else [root])
        if not any(r.opcode == "dynamic-update-slice" for r in roots):
            return set(), None
        in_place, written = set(), 0.0
        for r in roots:
            if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
                in_place.add(_through_views(comp, r.operands[0]))
                update = comp.by_name.get(r.operands[1])
                written += update.result_bytes if update is not None else 0.0
            else:
                written += r.result_bytes
        return in_place, written

    def _sliced_bytes(self, name: str, users: dict[str, list[Instruction]]) -> Optional[float]:
        """Bytes read of a fusion parameter that is only sliced (through views, or by a fusion
        nested inside, e.g. one layer of the stacked saved activations), else None."""
        total = 0.0
        for user in users.get(name, []):
            if user.opcode in _SLICERS and user.operands and user.operands[0] == name:
                total += user.result_bytes
            elif user.opcode in ("bitcast", "reshape"):
                inner = self._sliced_bytes(user.name, users)
                if inner is None:
                    return None
                total += inner
            elif user.opcode == "fusion" and user.called("calls") in self.module.computations:
                nested = self.fused(user.called("calls")).read
                positions = [k for k, op in enumerate(user.operands) if op == name]
                parts = [nested[k] if k < len(nested) else None for k in positions]
                if not parts or any(p is None for p in parts):
                    return None
                total += sum(parts)
            else:
                return None
        return total if users.get(name) else None

    def operand_bytes(self, instr: Instruction, comp: Computation) -> list[float]:
        out = []
        for name in instr.operands:
            op = comp.by_name.get(name)
            out.append(op.result_bytes if op is not None else 0.0)
        return out

    def op_cost(self, instr: Instruction, comp: Computation) -> tuple[float, float, float]:
        """(FLOPs, MXU FLOPs, HBM bytes) of one compute op."""
        operand_bytes = self.operand_bytes(instr, comp)
        if instr.opcode == "fusion" and instr.called("calls") in self.module.computations:
            cost = self.fused(instr.called("calls"))
            read = cost.read + [None] * len(operand_bytes)
            total = sum(b if r is None else min(r, b) for b, r in zip(operand_bytes, read))
            return cost.flops, cost.mxu_flops, total + (instr.result_bytes if cost.written is None
                                                         else cost.written)
        if instr.opcode in ("dot", "convolution"):
            flops = dot_flops(instr, comp)
            return (flops, flops / mxu_fill(instr, comp, self.mxu_side),
                    sum(operand_bytes) + instr.result_bytes)
        if instr.opcode == "custom-call":
            if "AllocateBuffer" in instr.rest or "AssumeGatherIndicesInBound" in instr.rest:
                return 0.0, 0.0, 0.0
            flops = attention_kernel_flops(instr, comp)
            return (flops, flops / attention_mxu_fill(instr, comp, self.mxu_side),
                    sum(operand_bytes) + instr.result_bytes)
        if instr.opcode == "dynamic-update-slice":
            update = operand_bytes[1] if len(operand_bytes) > 1 else 0.0
            return 0.0, 0.0, 2 * update
        if instr.opcode in _SLICERS:
            return 0.0, 0.0, 2 * instr.result_bytes
        return 0.0, 0.0, sum(operand_bytes) + instr.result_bytes

    def fused_collectives(self, instr: Instruction) -> tuple:
        """Collectives a fusion runs inside itself (async collective fusion), else ()."""
        if instr.opcode == "fusion" and instr.called("calls") in self.module.computations:
            return self.fused(instr.called("calls")).collectives
        return ()


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
