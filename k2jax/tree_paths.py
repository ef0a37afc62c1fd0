"""Read and write a leaf of a nested-dict tree (a params tree, a checkpoint's metadata tree) by
its path of keys, e.g. ("layers", "attention", "q_proj", "kernel")."""

from __future__ import annotations

from typing import Any


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    """tree[path[0]][path[1]]...; KeyError when a key is missing."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """Put `value` at `path`, creating the dicts on the way (in place)."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
