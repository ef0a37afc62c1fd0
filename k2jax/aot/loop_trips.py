"""Trip counts of XLA `while` loops (the scan over layers, the micro-batch loop, windowed-einsum
loops) from an optimized HLO module: its known_trip_count, else from the condition `i < N`,
the body's step `i + c` and i's initial value."""

from __future__ import annotations

import re
from typing import Optional

from k2jax.aot.hlo_text import Computation, Instruction, Module


def trip_count(module: Module, instr: Instruction, parent: Computation) -> Optional[int]:
    """Trips of a while loop: its known_trip_count, else from `i < N` in its condition,
    the step `i + c` in its body and i's initial value (0 unless a constant)."""
    known = re.search(r'known_trip_count"?\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instr.rest)
    if known:
        return int(known.group(1))
    cond = module.computations.get(instr.called("condition") or "")
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
        body = module.computations.get(instr.called("body") or "")
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


def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


def _constant_value(comp: Computation, name: str) -> Optional[int]:
    """The integer constant `name` is, also through copies (a peeled loop's counter starts
    at `copy(constant(1))`: XLA moved its first iteration out of the loop)."""
    op = comp.by_name.get(name)
    for _ in range(4):
        if op is None or op.opcode not in ("copy", "bitcast", "convert") or not op.operands:
            break
        op = comp.by_name.get(op.operands[0])
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
