"""Issue 15, conversion: a damaged weights directory, an unusable --out and a concurrent
conversion give one line, exit 2, and replace nothing."""

from __future__ import annotations

import os
import shutil

import pytest

from convert_fixtures import write_converted_tiny_model
from k2jax.cli import main
from k2jax import atomic_write


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return write_converted_tiny_model(tmp_path_factory.mktemp("converted"))


def fails_in_one_line(capsys, argv, *expected):
    capsys.readouterr()
    assert main([*map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)


def _truncate_largest(weights):
    big = max((p for p in (weights / "params").rglob("*") if p.is_file()),
              key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])


WEIGHT_DAMAGE = {
    "_METADATA deleted": (lambda w: (w / "params" / "_METADATA").unlink(),
                          ["_METADATA missing"]),
    "params file truncated": (_truncate_largest, ["cannot be read from", "tensor "]),
}


@pytest.mark.parametrize("case", WEIGHT_DAMAGE, ids=list(WEIGHT_DAMAGE))
def test_orbax_to_hf_on_damaged_weights(converted, tmp_path, capsys, case):
    damage, expected = WEIGHT_DAMAGE[case]
    weights = tmp_path / "weights"
    shutil.copytree(converted / "weights", weights)
    damage(weights)
    fails_in_one_line(capsys, ["convert", "orbax-to-hf", "--checkpoint", weights, "--out",
                               tmp_path / "export"], *expected)
    assert not (tmp_path / "export").exists()


def test_out_under_a_file(converted, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    fails_in_one_line(capsys, ["convert", "hf-to-orbax", "--hf", converted / "hf", "--out",
                               tmp_path / "afile" / "w"], "afile/w: its parent is not a directory")


def test_orbax_to_hf_with_a_relative_checkpoint_path(converted, tmp_path, capsys, monkeypatch):
    """The README's own form (`--checkpoint runs/...`)."""
    monkeypatch.chdir(converted)
    assert main(["convert", "orbax-to-hf", "--checkpoint", "weights", "--out",
                 str(tmp_path / "export"), "--no-progress"]) == 0
    assert (tmp_path / "export" / "config.json").exists()


def test_a_concurrent_conversion_keeps_the_output_that_finished_first(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="appeared while converting"):
        with atomic_write.atomic_output_dir(out, force=False) as staging:
            (staging / "mine").write_text("mine")
            out.mkdir()  # the other writer renamed its complete output into place first
            (out / "theirs").write_text("theirs")
    assert sorted(os.listdir(out)) == ["theirs"]
    assert not [p for p in os.listdir(tmp_path) if ".incomplete-" in p]


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"llama"'])
def test_config_json_that_is_not_an_object(converted, tmp_path, capsys, text):
    hf = tmp_path / "hf"
    shutil.copytree(converted / "hf", hf)
    (hf / "config.json").write_text(text)
    fails_in_one_line(capsys, ["convert", "hf-to-orbax", "--hf", hf, "--out", tmp_path / "w"],
                      "config.json: expected a JSON object")
    assert not (tmp_path / "w").exists()
