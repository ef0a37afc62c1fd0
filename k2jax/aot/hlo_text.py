"""A parser for the optimized HLO text of a compiled step (`compiled.as_text()`): computations,
their instructions in schedule order, result shapes, operands and attributes.

Only what the step-time model needs is parsed; an attribute is kept as raw text
(`Instruction.attr("replica_groups")`). An instruction may span several text lines (kernel
metadata holds newlines): a line continues the previous instruction unless it starts a new
`%name = ...`, a computation header or a closing brace.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
    "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "token": 0,
}

_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^{}]*(?:\([^()]*\)[^{}]*)*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$", re.S)


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    host: bool = False  # in host memory (layout memory space S(5): offloaded activations)

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> float:
        return self.elements * DTYPE_BYTES.get(self.dtype, 4)


def parse_shape(text: str) -> list[Array]:
    """Arrays of a result type: one for `bf16[8,128]{1,0}`, several for a tuple."""
    return [Array(dtype, tuple(int(d) for d in dims.split(",") if d), "S(5)" in layout)
            for dtype, dims, layout in _ARRAY.findall(text) if dtype in DTYPE_BYTES]


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: list[Array]  # the result (tuple elements in order)
    operands: list[str]  # operand instruction names
    rest: str  # the text after the operand list: attributes, metadata
    operand_text: str = ""  # raw: `0` of parameter(0), `3` of constant(3)

    @property
    def result_bytes(self) -> float:
        return sum(a.bytes for a in self.shape)

    def attr(self, key: str) -> Optional[str]:
        """Raw text of attribute `key=...` (balanced braces/brackets), or None."""
        match = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", self.rest)
        if not match:
            return None
        start = i = match.end()
        depth = 0
        while i < len(self.rest):
            c = self.rest[i]
            if c in "{[(":
                depth += 1
            elif c in "}])":
                if depth == 0:
                    break
                depth -= 1
            elif c == "," and depth == 0:
                break
            i += 1
        return self.rest[start:i].strip()

    def called(self, key: str) -> Optional[str]:
        value = self.attr(key)
        return value.lstrip("%") if value else None

    @property
    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.rest)
        return match.group(1) if match else ""


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]  # in schedule order
    is_entry: bool = False
    root_name: Optional[str] = None  # the ROOT instruction (default: the last)

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction:
        return self.instructions[-1] if self.root_name is None else self.by_name[self.root_name]


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str

    def __getitem__(self, name: str) -> Computation:
        return self.computations[name]


def _split_operands(text: str) -> tuple[str, str]:
    """(`a, b` inside the opcode's parentheses, the rest after the closing one)."""
    depth = 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                return text[:i], text[i + 1:]
            depth -= 1
    return text, ""


def _logical_lines(text: str):
    """Instruction/header/brace lines with continuation lines joined on."""
    current: Optional[str] = None
    for line in text.splitlines():
        starts = (_INSTR.match(line) is not None or line.rstrip() == "}"
                  or (not line.startswith(" ") and _HEADER.match(line) is not None))
        if starts:
            if current is not None:
                yield current
            current = line
        elif current is not None:
            current += "\n" + line
    if current is not None:
        yield current


def parse_module(text: str) -> Module:
    """Parse `compiled.as_text()` (or any HLO module text) into computations."""
    computations: dict[str, Computation] = {}
    entry = None
    name = None
    instrs: list[Instruction] = []
    root = None
    is_entry = False
    for line in _logical_lines(text):
        if line.rstrip() == "}":
            if name is not None:
                computations[name] = Computation(name, instrs, is_entry, root)
            name, instrs, root = None, [], None
            continue
        if not line.startswith(" "):
            header = _HEADER.match(line.split("\n")[0])
            if header and not line.startswith("HloModule"):
                name, is_entry, instrs, root = header.group(2), bool(header.group(1)), [], None
                if is_entry:
                    entry = name
            continue
        match = _INSTR.match(line)
        if not match or name is None:
            continue
        is_root, iname, shape, opcode, tail = match.groups()
        operand_text, rest = _split_operands(tail)
        operands = re.findall(r"%([\w.\-]+)", operand_text)
        instrs.append(Instruction(iname, opcode, parse_shape(shape), operands, rest,
                                  operand_text.strip()))
        if is_root:
            root = iname
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return Module(computations, entry)


def replica_groups(instr: Instruction, num_devices: int) -> list[list[int]]:
    """Device-id groups of a collective, from any of XLA's three spellings:
    explicit `{{0,2},{1,3}}`, iota `[2,2]<=[2,2]T(1,0)`, mesh `mesh['a'=2,'b'=2] {'b'}`.
    No (or empty) groups: one group of all devices."""
    text = instr.attr("replica_groups")
    if text is None or text in ("{}", "{{}}", ""):
        return [list(range(num_devices))]
    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([0-9,\s]*)\}", text)]
    iota = re.fullmatch(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text)
    if iota:
        import numpy as np

        groups_shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(groups_shape[0], -1).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?"
                     r"\s*\{([^}]*)\}", instr.rest)
    if mesh:
        import numpy as np

        axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
        names = [a for a, _ in axes]
        sizes = [int(s) for _, s in axes]
        ids = np.arange(math.prod(sizes))
        if mesh.group(2):  # the devices in mesh order: an iota `[2,2]T(1,0)` or a list
            order = re.fullmatch(r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?", mesh.group(2).strip())
            if order:
                ids = ids.reshape([int(x) for x in order.group(1).split(",")])
                if order.group(2):
                    ids = ids.transpose([int(x) for x in order.group(2).split(",")])
                ids = ids.reshape(-1)
            else:
                ids = np.asarray([int(x) for x in re.findall(r"\d+", mesh.group(2))])
        ids = ids.reshape(sizes)
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", mesh.group(3))]
        kept = [i for i in range(len(axes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return ids.transpose(kept + grouped).reshape(-1, size).tolist()
    raise ValueError(f"unrecognised replica_groups in {instr.name}: {text[:80]}")
