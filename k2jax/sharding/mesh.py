"""Build the device mesh from `mesh.*` settings.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (Megatron-style tensor parallel over heads and MLP). Within a slice the
device order follows the physical topology (jax.experimental.mesh_utils); across slices
(`dcn_*` > 1, multi-slice pods) a hybrid mesh puts the slower DCN links on the outer axes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from k2jax.config import MeshConfig
from k2jax.errors import UserError

AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Per-slice (ICI) axis sizes with the -1 filled in."""
    num_slices = config.dcn_data * config.dcn_fsdp * config.dcn_tensor
    if num_devices % num_slices:
        raise UserError(f"mesh: {num_devices} devices cannot form {num_slices} slices "
                        "(mesh.dcn_data x mesh.dcn_fsdp x mesh.dcn_tensor)")
    per_slice = num_devices // num_slices
    sizes = [config.data, config.fsdp, config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise UserError(f"mesh: {per_slice} devices per slice are not divisible by the fixed "
                            f"axis sizes (data x fsdp x tensor without -1 = {known})")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise UserError(f"mesh: data x fsdp x tensor = {'x'.join(map(str, sizes))} = "
                        f"{math.prod(sizes)} does not match the {per_slice} devices per slice")
    return tuple(sizes)


def build_mesh(config: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    ici = resolve_axis_sizes(config, len(devices))
    dcn = (config.dcn_data, config.dcn_fsdp, config.dcn_tensor)
    if math.prod(dcn) > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices,
                                                             allow_split_physical_axes=True)
    else:
        try:
            device_array = mesh_utils.create_device_mesh(ici, devices=devices,
                                                         allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            device_array = np.asarray(devices).reshape(ici)  # no topology info (e.g. CPU)
    return Mesh(device_array, AXES)
