"""docs/k2.md's table of K2's settings (issue 26): every k2jax key it names is a real config
key, and the values it gives for the shipped configs are the configs' values; and the facts
issue 26.5 corrected stay corrected."""

from __future__ import annotations

import re

import pytest

from k2jax.config import load_config
from train_utils import REPO

K2_MD = (REPO / "docs" / "k2.md").read_text()
TABLE = K2_MD.split("## K2's settings in k2jax", 1)[1]
PRESETS = ("k2-65b", "k2-stage2", "k2-chat")


def table_rows() -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in TABLE.splitlines()
            if line.startswith("| ") and not line.startswith("| fact")]
    return [[cell.strip() for cell in row] for row in rows]


def config_value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_key_in_the_table_is_a_config_key():
    keys = [key for row in table_rows()
            for key in re.findall(r"`((?:train|data|model|optimizer)\.[a-z_.]+)`", row[2])]
    assert len(keys) >= 12
    configs = [load_config(name) for name in PRESETS]
    for key in keys:
        for config in configs:
            config_value(config, key)  # AttributeError if the table names no real key


@pytest.mark.parametrize("key, values", [
    ("train.checkpoint_at_chunk_ends", (False, True, False)),
    ("data.use_tgt_mask", (False, False, True)),
    ("train.spikes.rollback_unit", ("file", "file", "file")),
    ("train.spikes.trend_window", (941, 941, 941)),
    ("train.spikes.trend_baseline", (18820, 18820, 18820)),
    ("train.steps", (338760, "auto", 338760)),
    ("data.chat.trained_turns", ("all-assistant-turns", "all-assistant-turns", "final")),
])
def test_the_values_the_table_states_are_the_configs(key, values):
    assert tuple(config_value(load_config(name), key) for name in PRESETS) == values
    [row] = [r for r in table_rows() if f"`{key}`" in r[2]]
    assert row[1], f"{key}: no K2 source named"


def test_the_corrected_facts_stay_corrected():
    assert "presumably ids" not in K2_MD and "confirmed by K2's tokenizer files" in K2_MD
    assert "the lr at iteration i is lr(step i)" in K2_MD
    assert "bf16-rounded" in K2_MD and "main_grad" in K2_MD
    reproduce = (REPO / "docs" / "reproduce.md").read_text()
    assert "published only as its `.pyc`" not in reproduce
