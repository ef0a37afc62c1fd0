"""Shard planning without compiling: k2jax/sharding/mesh.py (axis sizes from mesh.*) and
k2jax/sharding/rules.py (logical axes -> PartitionSpec through mesh.rules, a missing or bad
rule named). One CPU device; PartitionSpecs do not depend on the mesh's sizes."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from k2jax.config import ConfigError, MeshConfig, load_config
from k2jax.errors import UserError
from k2jax.sharding.mesh import AXES, build_mesh, resolve_axis_sizes
from k2jax.sharding.rules import batch_sharding, param_shardings, replicated


@pytest.mark.parametrize("settings, devices, sizes", [
    ({}, 8, (1, 8, 1)),  # the default: FSDP over every device
    ({"tensor": 2}, 8, (1, 4, 2)),
    ({"data": -1, "fsdp": 2, "tensor": 2}, 16, (4, 2, 2)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"dcn_data": 2}, 16, (1, 8, 1)),  # sizes are per slice
    ({"dcn_data": 2, "dcn_fsdp": 2, "tensor": 4}, 512, (1, 32, 4)),
])
def test_axis_sizes_fill_the_minus_one_per_slice(settings, devices, sizes):
    assert resolve_axis_sizes(MeshConfig(**settings), devices) == sizes


@pytest.mark.parametrize("settings, devices, message", [
    ({"dcn_data": 3}, 8, "8 devices cannot form 3 slices"),
    ({"tensor": 3}, 8, "not divisible by the fixed axis sizes"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "2x2x1 = 4 does not match the 8 devices"),
])
def test_axis_sizes_that_do_not_fit_the_devices(settings, devices, message):
    with pytest.raises(UserError, match=f"^mesh: .*{message}"):
        resolve_axis_sizes(MeshConfig(**settings), devices)


@pytest.mark.parametrize("override, key", [
    ("mesh.rules.embed=pipeline", "mesh.rules.embed"),
    ("mesh.tensor=0", "mesh.tensor"),
    ("mesh.data=-1", "mesh"),  # with fsdp -1 as well: two axes to fill
])
def test_bad_mesh_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"^config key '{key}': "):
        load_config(None, [override])


def boxed(names_by_path: dict[str, tuple]) -> dict:
    return {path: nn.LogicallyPartitioned(np.zeros((2,) * len(names), np.float32), names)
            for path, names in names_by_path.items()}


def one_device_mesh():
    return build_mesh(MeshConfig(), jax.devices()[:1])


def test_rules_give_each_parameter_its_partition_spec():
    mesh = one_device_mesh()
    assert mesh.axis_names == AXES and mesh.devices.shape == (1, 1, 1)
    params = boxed({"q_proj": ("embed", "heads", "head_dim"), "down_proj": ("mlp", "embed"),
                    "stacked": ("layers", "embed", "mlp"), "scale": ("norm",)})
    specs = {k: s.spec for k, s in param_shardings(params, mesh, MeshConfig().rules).items()}
    assert specs == {"q_proj": P("fsdp", "tensor", None), "down_proj": P("tensor", "fsdp"),
                     "stacked": P(None, "fsdp", "tensor"), "scale": P(None)}
    rules = MeshConfig(rules={"embed": ["data", "fsdp"], "mlp": None}).rules  # YAML lists
    specs = {k: s.spec for k, s in param_shardings(params, mesh, rules).items()}
    assert specs["down_proj"] == P(None, ("data", "fsdp"))
    assert specs["q_proj"] == P(("data", "fsdp"), "tensor", None)


def test_a_logical_axis_without_a_rule_is_named_with_its_parameter():
    params = boxed({"q_proj": ("embed", "heads", "head_dim"), "experts": ("embed", "expert")})
    with pytest.raises(UserError, match=r"mesh.rules: parameter \['experts'\] uses logical "
                                        r"axis 'expert', which no rule maps"):
        param_shardings(params, one_device_mesh(), MeshConfig().rules)


def test_batch_rows_go_over_the_data_parallel_axes():
    mesh = one_device_mesh()
    assert batch_sharding(mesh, MeshConfig().rules).spec == P(("data", "fsdp"), None)
    assert batch_sharding(mesh, MeshConfig(rules={"batch": "data"}).rules).spec == P("data", None)
    assert replicated(mesh).spec == P()
