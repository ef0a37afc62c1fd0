"""Logical axis names -> mesh axes (the `mesh.rules` table) and the shardings they imply.

Every logical axis that a parameter uses must appear in the table: an axis no rule names is a
configuration error, never a silent replication.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from k2jax.errors import UserError


def rules_list(rules: dict[str, Any]) -> list[tuple[str, Any]]:
    """flax's rule format: [(logical, mesh axis | tuple of mesh axes | None), ...]."""
    return [(name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules.items()]


def check_rules_cover(boxed_params: Any, rules: dict[str, Any]) -> None:
    """Raise naming the parameter and axis if any logical axis has no rule."""
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        for axis in getattr(leaf, "names", ()):
            if axis not in rules:
                name = jax.tree_util.keystr(path)
                raise UserError(f"mesh.rules: parameter {name} uses logical axis '{axis}', which "
                                "no rule maps (add it to mesh.rules, with null to replicate)")


def param_shardings(boxed_params: Any, mesh: Mesh, rules: dict[str, Any]) -> Any:
    """NamedSharding pytree (unboxed structure) for logically partitioned parameters."""
    check_rules_cover(boxed_params, rules)
    specs = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules_list(rules))


def batch_sharding(mesh: Mesh, rules: dict[str, Any]) -> NamedSharding:
    """Rows of a [B, S] batch spread over the data-parallel axes."""
    batch_axes = dict(rules_list(rules)).get("batch")
    return NamedSharding(mesh, PartitionSpec(batch_axes, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
