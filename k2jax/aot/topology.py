"""TPU slice names (Google's) -> libtpu topology strings and per-chip figures.

Google's slice names count TensorCores for v4 and v5p (2 per chip: v5p-512 is 256 chips,
`v5p:4x8x8`) and chips for v5e and v6e (v5e-256 is 256 chips, `v5e:16x16`). For tpu7x
(Ironwood) the N of `tpu7x-N` counts TensorCores too, which there are the JAX devices (2 per
chip, each its own device): tpu7x-8 is `tpu7x:2x2x1`, 4 chips, 8 devices. A topology string
such as `v5p:4x8x8` or `tpu7x:2x2x1` (chips per axis) is accepted as is.
"""

from __future__ import annotations

import dataclasses
import math
import re

from k2jax.aot.chips import CHIPS, DEVICES_PER_CHIP
from k2jax.errors import UserError



@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # libtpu's prefix
    cores_per_chip_in_name: int  # 2: the slice suffix counts TensorCores
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    hbm_bytes: int  # per JAX device (a chip, or half a tpu7x chip)
    peak_flops: float  # bf16 dense, per JAX device
    devices_per_chip: int = 1  # 2 on tpu7x


def _generation(name: str, cores_per_chip_in_name: int) -> Generation:
    chip = CHIPS[name]  # the one table of chip figures (with their sources)
    return Generation(name, cores_per_chip_in_name, chip.torus_dims, chip.hbm_bytes,
                      chip.peak_flops, DEVICES_PER_CHIP[name])


GENERATIONS = {"v4": _generation("v4", 2), "v5p": _generation("v5p", 2),
               "v5e": _generation("v5e", 1), "v6e": _generation("v6e", 1),
               "tpu7x": _generation("tpu7x", 2)}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given, e.g. "v5p-512"
    generation: Generation
    topology: str  # libtpu's, e.g. "v5p:4x8x8"
    chips: int

    @property
    def devices(self) -> int:
        """JAX devices of the slice (2 per chip on tpu7x)."""
        return self.chips * self.generation.devices_per_chip


def _shape_for(chips: int, dims: int) -> list[int]:
    """The standard slice shape: grow by doubling the smallest axis (the last among equals)."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    if dims == 3 and chips < 4:
        raise ValueError
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError
    return shape


def parse_slice(name: str) -> Slice:
    """`v5p-512` or `v5p:4x8x8` -> Slice; a clear error for anything else."""
    known = ", ".join(GENERATIONS)
    match = re.fullmatch(r"((?:v|tpu)\d+[a-z]*)[:](\d+(?:x\d+)+)", name)
    if match:
        gen = GENERATIONS.get(match.group(1))
        if gen is None:
            raise UserError(f"topology {name}: unknown TPU generation (known: {known})")
        chips = math.prod(int(d) for d in match.group(2).split("x"))
        return Slice(name, gen, name, chips)
    match = re.fullmatch(r"((?:v|tpu)\d+[a-z]*)-(\d+)", name)
    if not match or match.group(1) not in GENERATIONS:
        raise UserError(f"topology {name}: expected NAME-SIZE like v5p-512, v4-1024, v5e-256, "
                        f"v6e-256, tpu7x-8 (generations: {known}) or a topology like v5p:4x8x8")
    gen = GENERATIONS[match.group(1)]
    size = int(match.group(2))
    chips, odd = divmod(size, gen.cores_per_chip_in_name)
    try:
        if odd:
            raise ValueError
        shape = _shape_for(chips, gen.dims)
    except ValueError:
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip_in_name == 2 else "chips"
        raise UserError(f"topology {name}: {size} {unit} is not a standard {gen.name} slice "
                        f"(use a power of two, or give the shape, e.g. {gen.name}:2x2"
                        f"{'x1' if gen.dims == 3 else ''})") from None
    return Slice(name, gen, f"{gen.name}:{'x'.join(map(str, shape))}", chips)
