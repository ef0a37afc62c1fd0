"""Seconds of one collective on a TPU slice (or several over DCN), from its replica groups.

Bandwidth: a replica group spans some physical torus axes of its slice (the axes along which
its chips' coordinates differ). A ring along one axis moves data over that axis's links in both
directions when the axis wraps around (a torus: 2 x the one-way link bandwidth), in one
direction's worth when it does not (a line); a group spanning several axes uses them all at once
(the bandwidths add), as in the JAX scaling book's collective costs. Link and DCN figures are
the chip's rated ones times the fraction a measured collective reached (Chip.ici_efficiency,
Chip.dcn_efficiency: k2jax/aot/chips.py says which measurements).

Bytes (ring algorithms, n chips in the group, per chip):
  all-gather      output x (n-1)/n          reduce-scatter  input x (n-1)/n
  all-reduce      2 x bytes x (n-1)/n       all-to-all      bytes x n/4 (bisection-bound)
  collective-permute  bytes over one one-way link (neighbour exchanges)
Across slices (chips of one group in k slices): the ICI part runs within a slice over its n/k
chips, and the slice-to-slice part moves the same ring fraction of bytes/(n/k) over each chip's
DCN egress, one after the other (XLA decomposes multi-slice collectives hierarchically).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from k2jax.aot.chips import Chip, axis_wraps
from k2jax.aot.hlo_text import Instruction, replica_groups


@dataclasses.dataclass(frozen=True)
class DeviceLayout:
    """Where each device id of a compiled program sits: its slice and torus coordinates.

    `coords[i]`, `slices[i]`: of device id i (the program's device assignment order, the mesh's
    flattened devices). `dims`: the torus shape of one slice, e.g. (4, 8, 8)."""

    coords: tuple[tuple[int, ...], ...]
    slices: tuple[int, ...]
    dims: tuple[int, ...]

    @classmethod
    def from_devices(cls, devices: Sequence) -> "DeviceLayout":
        coords = tuple(tuple(int(c) for c in d.coords) for d in devices)
        slices = tuple(int(getattr(d, "slice_index", 0) or 0) for d in devices)
        dims = tuple(max(c[a] for c in coords) + 1 for a in range(len(coords[0])))
        return cls(coords, slices, dims)

    @classmethod
    def grid(cls, dims: Sequence[int], num_slices: int = 1) -> "DeviceLayout":
        """Devices ordered x fastest (as TPU device ids count), slice after slice."""
        import itertools

        coords = [tuple(reversed(c)) for c in itertools.product(*(range(d) for d in reversed(dims)))]
        per = len(coords)
        return cls(tuple(coords * num_slices), tuple(i // per for i in range(per * num_slices)),
                   tuple(dims))


def ici_bandwidth(group: Sequence[int], chip: Chip, layout: DeviceLayout) -> float:
    """Bytes/s one chip can push around the rings of `group` (one slice's part of it)."""
    coords = [layout.coords[i] for i in group]
    total = 0.0
    for axis, length in enumerate(layout.dims):
        span = len({c[axis] for c in coords})
        if span > 1:
            both_ways = axis_wraps(chip, length, span)
            total += chip.ici_link_achieved * (2 if both_ways else 1)
    return total or chip.ici_link_achieved


def _ring_bytes(kind: str, n: int, operand_bytes: float, out_bytes: float) -> float:
    if n <= 1:
        return 0.0
    frac = (n - 1) / n
    if kind == "all-gather":
        return out_bytes * frac
    if kind == "reduce-scatter":
        return operand_bytes * frac
    if kind == "all-reduce":
        return 2 * out_bytes * frac
    if kind in ("all-to-all", "ragged-all-to-all"):
        return out_bytes * n / 4
    return out_bytes  # collective-broadcast


def collective_seconds(kind: str, instr: Instruction, operand_bytes: float, out_bytes: float,
                       chip: Chip, layout: DeviceLayout) -> float:
    """Seconds one chip spends in collective `kind` (`instr` carries its groups)."""
    num_devices = len(layout.coords)
    if kind == "collective-permute":
        pairs = [tuple(int(x) for x in p.split(","))
                 for p in _pairs(instr.attr("source_target_pairs") or "")]
        moving = [(s, t) for s, t in pairs if s != t]
        if not moving:
            return 0.0
        if any(layout.slices[s] != layout.slices[t] for s, t in moving):
            return out_bytes / chip.dcn_achieved
        return out_bytes / chip.ici_link_achieved
    group = replica_groups(instr, num_devices)[0]
    slices = sorted({layout.slices[i] for i in group})
    per_slice = [i for i in group if layout.slices[i] == slices[0]]
    n_ici, n_dcn = len(per_slice), len(slices)
    seconds = _ring_bytes(kind, n_ici, operand_bytes, out_bytes) / ici_bandwidth(
        per_slice, chip, layout)
    if n_dcn > 1:  # the slice-to-slice stage carries 1/n_ici of the bytes per chip
        seconds += _ring_bytes(kind, n_dcn, operand_bytes / n_ici,
                               out_bytes / n_ici) / chip.dcn_achieved
    return seconds


def megascale_seconds(transfer_type: str, payload_bytes: float, chip: Chip,
                      layout: DeviceLayout) -> float:
    """Seconds one chip spends in the slice-to-slice stage of a collective that libtpu's
    multi-slice compile hands to the Megascale runtime: a `send` of `payload_bytes` (this
    chip's shard) with `_xla_megascale_transfer_type` ALL_REDUCE, ALL_GATHER, ... between all
    the program's slices (k2jax's DCN axes span every slice), over the chip's DCN egress."""
    n = len(set(layout.slices))
    kind = transfer_type.lower().replace("_", "-")
    out_bytes = payload_bytes * (n if kind == "all-gather" else 1)
    return _ring_bytes(kind, n, payload_bytes, out_bytes) / chip.dcn_achieved


def _pairs(text: str) -> list[str]:
    import re

    return re.findall(r"\{(\d+\s*,\s*\d+)\}", text)
