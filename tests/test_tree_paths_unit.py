"""k2jax/tree_paths.py: a leaf of a nested-dict tree by its path of keys."""

from __future__ import annotations

import pytest

from k2jax.tree_paths import get_path, set_path


def test_set_creates_the_dicts_on_the_way_and_get_reads_back():
    tree: dict = {"embed": {"embedding": 1}}
    set_path(tree, ("layers", "attention", "q_proj", "kernel"), 2)
    set_path(tree, ("layers", "attention", "k_proj", "kernel"), 3)
    assert tree == {"embed": {"embedding": 1},
                    "layers": {"attention": {"q_proj": {"kernel": 2}, "k_proj": {"kernel": 3}}}}
    assert get_path(tree, ("layers", "attention", "k_proj", "kernel")) == 3
    assert get_path(tree, ("embed",)) == {"embedding": 1}
    set_path(tree, ("embed", "embedding"), 4)  # replaces a leaf in place
    assert tree["embed"] == {"embedding": 4}


def test_a_missing_key_is_a_key_error():
    with pytest.raises(KeyError, match="v_proj"):
        get_path({"attention": {"q_proj": 1}}, ("attention", "v_proj"))
