"""`k2jax convert` refuses bad input with one clear line, exit 2, and nothing written."""

from __future__ import annotations

import os

import pytest
import torch

from convert_fixtures import hf_config, hf_state, tiny_hf_model, write_hf_dir
from k2jax.cli import main


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model()


def run_fails(capsys, tmp_path, argv, *expected):
    """main(argv) exits 2 with one stderr line holding every `expected` string, and neither the
    output nor a staging directory exists afterwards."""
    capsys.readouterr()
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, (text, err)
    out = argv[argv.index("--out") + 1]
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".incomplete-" in p]
    return err


def to_orbax(src, out):
    return ["convert", "hf-to-orbax", "--hf", str(src), "--out", str(out)]


def edited_state(model, edit):
    state = hf_state(model)
    edit(state)
    return state


STATE_EDITS = {
    "missing": (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
                ["missing tensor model.layers.1.mlp.up_proj.weight"]),
    "unexpected": (lambda s: s.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(3)),
                   ["unexpected tensor model.layers.0.mlp.extra.weight", "model.safetensors"]),
    "bias": (lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)),
             ["model.layers.0.self_attn.q_proj.bias", "biases are not supported"]),
    "shape": (lambda s: s.__setitem__("model.layers.1.self_attn.k_proj.weight",
                                      torch.zeros(64, 64)),
              ["shape mismatch", "model.layers.1.self_attn.k_proj.weight", "[64, 64]",
               "[32, 64]", "model.safetensors"]),
    "dtype": (lambda s: s.__setitem__("model.norm.weight", torch.zeros(64, dtype=torch.int32)),
              ["model.norm.weight", "I32", "not supported"]),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_bad_tensors(case, model, tmp_path, capsys):
    edit, expected = STATE_EDITS[case]
    src = write_hf_dir(tmp_path / "hf", edited_state(model, edit), hf_config(model))
    run_fails(capsys, tmp_path, to_orbax(src, tmp_path / "w"), *expected)


CONFIG_EDITS = {
    "vocab": (dict(vocab_size=256), ["vocab mismatch", "vocab_size=256", ".weight in",
                                     "model.safetensors has 250 rows"]),
    "model_type": (dict(model_type="mistral"), ["config.json", "'mistral'"]),
    "rope_scaling": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                          rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 10000.0}),
                     ["config.json", "rope scaling"]),
    "attention_bias": (dict(attention_bias=True), ["config.json", "attention_bias"]),
    "hidden_act": (dict(hidden_act="gelu"), ["config.json", "hidden_act"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_bad_config(case, model, tmp_path, capsys):
    changes, expected = CONFIG_EDITS[case]
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model, **changes))
    run_fails(capsys, tmp_path, to_orbax(src, tmp_path / "w"), *expected)


def _truncate(path, keep_fraction=0.6):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard(fmt, model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model), fmt, shards=2)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    shard = src / f"{stem}-00002-of-00002.{'safetensors' if fmt == 'safetensors' else 'bin'}"
    _truncate(shard)
    run_fails(capsys, tmp_path, to_orbax(src, tmp_path / "w"), shard.name)


def test_corrupt_safetensors_header(model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    with open(src / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)
    run_fails(capsys, tmp_path, to_orbax(src, tmp_path / "w"), "model.safetensors", "corrupt")


def test_index_names_missing_shard(model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model), shards=2)
    (src / "model-00001-of-00002.safetensors").unlink()
    run_fails(capsys, tmp_path, to_orbax(src, tmp_path / "w"), "model-00001-of-00002.safetensors",
              "does not exist")


def test_existing_output_needs_force(model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(to_orbax(src, out) + ["--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(to_orbax(src, out) + ["--no-progress", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["hf", "w"]  # no staging or old copy left


def test_output_may_not_replace_input(model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    capsys.readouterr()
    assert main(to_orbax(src, src) + ["--no-progress", "--force"]) == 2
    assert "replace the input" in capsys.readouterr().err
    assert (src / "model.safetensors").is_file()


def test_interrupted_conversion_leaves_nothing_complete(model, tmp_path, monkeypatch):
    from k2jax.convert import hf_to_orbax
    from k2jax.convert.orbax_writer import StreamingParamsWriter

    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    calls = []
    original = StreamingParamsWriter.write

    def write_then_interrupt(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(StreamingParamsWriter, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax.convert_hf_to_orbax(str(src), str(tmp_path / "w"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_orbax_to_hf_errors(model, tmp_path, capsys):
    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    assert main(to_orbax(src, tmp_path / "w") + ["--no-progress"]) == 0
    export = ["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "w"), "--out",
              str(tmp_path / "x")]
    run_fails(capsys, tmp_path, ["convert", "orbax-to-hf", "--checkpoint", str(src), "--out",
                                 str(tmp_path / "x")], "not a k2jax weights directory")
    run_fails(capsys, tmp_path, export + ["--shard-size", "lots"], "--shard-size", "'lots'")
    (tmp_path / "empty").mkdir()
    run_fails(capsys, tmp_path, export + ["--tokenizer", str(tmp_path / "empty")],
              "empty: no tokenizer files", "tokenizer.model")


def test_fp16_export_refuses_overflow(model, tmp_path, capsys):
    state = hf_state(model)
    state["model.norm.weight"] = state["model.norm.weight"] * 1e6
    src = write_hf_dir(tmp_path / "hf", state, hf_config(model))
    assert main(to_orbax(src, tmp_path / "w") + ["--no-progress"]) == 0
    run_fails(capsys, tmp_path, ["convert", "orbax-to-hf", "--checkpoint", str(tmp_path / "w"),
                                 "--out", str(tmp_path / "x"), "--dtype", "fp16"],
              "model.norm.weight", "float16 range")


def test_staging_left_by_a_killed_conversion_is_cleaned_up(model, tmp_path, capsys):
    """A SIGKILLed writer leaves `.NAME.incomplete-HOST-PID-*`; the next conversion to NAME
    deletes it, but keeps one whose writer is still running."""
    import socket
    import subprocess

    src = write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    exited = subprocess.Popen(["true"])
    exited.wait()
    host = socket.gethostname()
    dead = tmp_path / f".w.incomplete-{host}-{exited.pid}-abcd"
    alive = tmp_path / f".w.incomplete-{host}-{os.getpid()}-efgh"
    for staging in (dead, alive):
        staging.mkdir()
        (staging / "partial").write_bytes(b"x")
    assert main(to_orbax(src, tmp_path / "w") + ["--no-progress"]) == 0
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "w" / "params").is_dir()
