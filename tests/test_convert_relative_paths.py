"""`convert orbax-to-hf --checkpoint runs/.../checkpoints/N` with a relative path, as the README
writes it: Orbax gives no metadata for a relative training-checkpoint directory, so the reader
must make it absolute."""

from __future__ import annotations

import os

import pytest

from k2jax.cli import main

pytestmark = pytest.mark.slow  # trains one step (a compile)


def test_training_checkpoint_exports_from_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
    assert main(["train", "--config", config, "train.steps=1", "train.checkpoint_every=1",
                 "train.run_dir=runs/t", "model.num_layers=1",
                 "train.peak_flops_per_device=1e12"]) == 0
    assert main(["convert", "orbax-to-hf", "--checkpoint", "runs/t/checkpoints/1",
                 "--out", "export", "--dtype", "fp32"]) == 0
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
