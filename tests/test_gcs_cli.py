"""Issue 24's gs:// list from the command line, against the local GCS protocol server
(tests/gcs_server.py): generate, compare-hf and eval-tasks read Hugging Face and k2jax weights on
gs:// and answer as from local disk; a missing bucket is one line and exit 2 (also for K2's own
config, before any state is built); and no gs:// write of the pod path (data index, training,
conversions, a saved batch) goes through a rename, which gcsfs turns into a failed moveTo call
with a logged traceback before its copy-and-delete fallback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from k2jax.cli import main

REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_data_index_of_a_missing_bucket_is_one_line(gcs_server, capsys):
    for argv in (["data", "index", "--data", "gs://missing-bucket-k2jax/x"],
                 ["data", "index", "gs://missing-bucket-k2jax/x"]):
        line = one_error_line(capsys, argv)
        assert "gs://missing-bucket-k2jax/x: not found" in line, line


def test_gs_writes_are_one_upload_and_log_nothing(gcs_server, gcs_bucket, caplog):
    """atomic_write on gs:// uploads to the final name (no temporary, no rename: gcsfs's move
    logs a traceback on this server), and a failed block leaves nothing."""
    import logging

    import numpy as np

    from k2jax.atomic_write import atomic_file, write_json_atomic, write_npy_atomic

    caplog.set_level(logging.DEBUG)
    write_json_atomic(f"{gcs_bucket}/run/config.json", {"a": 1})
    write_npy_atomic(f"{gcs_bucket}/run/x.npy", np.arange(3))
    with atomic_file(f"{gcs_bucket}/run/notes.txt", "w") as f:
        f.write("text")
    with pytest.raises(RuntimeError):
        with atomic_file(f"{gcs_bucket}/run/broken", "wb") as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert sorted(gcs_server.list_objects(f"{gcs_bucket}/run/")) == [
        "run/config.json", "run/notes.txt", "run/x.npy"]
    assert gcs_server.read_object(f"{gcs_bucket}/run/notes.txt") == b"text"
    # (google.auth's one note that this machine has no metadata server is not about writes)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and not r.name.startswith("google.auth")] == []


def test_a_local_copy_of_a_gs_tokenizer_leaves_the_weights(gcs_server, gcs_bucket):
    from k2jax.generate.text_tokenizer import WEIGHT_SUFFIXES
    from k2jax.storage import remote

    fs = fsspec.filesystem("gs")
    for name in ("tokenizer.json", "config.json", "model.safetensors", "sub/extra.txt"):
        fs.pipe_file(f"{gcs_bucket[5:]}/tok/{name}", name.encode())
    local = remote.local_copy(f"{gcs_bucket}/tok", WEIGHT_SUFFIXES)
    found = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert found == ["config.json", "sub/extra.txt", "tokenizer.json"]
    assert Path(local, "tokenizer.json").read_bytes() == b"tokenizer.json"
    assert remote.local_copy(f"{gcs_bucket}/tok/", WEIGHT_SUFFIXES) == local  # once a process


def _k2jax(*argv, timeout=300) -> subprocess.CompletedProcess:
    from train_utils import subprocess_env

    return subprocess.run([sys.executable, "-m", "k2jax.cli", *map(str, argv)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # three CLI subprocesses (~10 s each: imports)
def test_k2_65b_config_with_a_missing_bucket_is_one_line_before_any_state(gcs_server):
    for overrides in (["data.path=gs://no-such-bucket-k2jax/data",
                       "train.run_dir=gs://no-such-bucket-k2jax/run"],
                      []):  # configs/k2-65b.yaml's own placeholders: gs://YOUR_BUCKET/...
        started = time.monotonic()
        result = _k2jax("train", "--config", REPO / "configs" / "k2-65b.yaml", *overrides)
        elapsed = time.monotonic() - started
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
        assert re.fullmatch(r"k2jax train: error: train.run_dir gs://\S+: bucket gs://\S+ does "
                            r"not exist", lines[0]), lines[0]
        # K2-65B's state is ~0.8 TB: building any of it on this machine would not end in 60 s.
        assert elapsed < 60, elapsed

    # The run_dir's bucket exists, the data's does not: refused before anything is written.
    run = f"{gcs_server.bucket()}/run"
    result = _k2jax("train", "--config", REPO / "configs" / "k2-65b.yaml",
                    "data.path=gs://no-such-bucket-k2jax/data", f"train.run_dir={run}")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "k2jax train: error: gs://no-such-bucket-k2jax/data: not found (no object under this "
        "prefix, or no such bucket)"], result.stderr[-3000:]
    assert gcs_server.list_objects(run) == []


def _quiet(result: subprocess.CompletedProcess, what: str) -> None:
    """Exit 0 and nothing on stderr that a failed gs:// rename (or any error) leaves."""
    assert result.returncode == 0, f"{what}: {result.stderr[-3000:]}"
    for marker in ("Traceback", "ERROR", "moveTo", "Falling back to copy"):
        assert marker not in result.stderr, f"{what}: {marker!r} in\n{result.stderr[-3000:]}"


@pytest.mark.slow  # index, a 2-step training and three conversions in subprocesses: ~2 min
def test_the_pod_path_writes_gs_objects_without_a_logged_error(gcs_server, gcs_bucket, tmp_path):
    from data_fixtures import write_chunk
    from train_utils import train_command

    local = tmp_path / "data"
    local.mkdir()
    for chunk in range(2):
        write_chunk(local, chunk, 40, seq_len=16)
    fs = fsspec.filesystem("gs")
    for path in local.iterdir():
        fs.put_file(str(path), f"{gcs_bucket[5:]}/data/{path.name}")
    data, run = f"{gcs_bucket}/data", f"{gcs_bucket}/run"
    _quiet(_k2jax("data", "index", "--data", data, "--quiet"), "data index")
    from train_utils import subprocess_env

    train = subprocess.run(
        train_command(run, "data.source=k2", "data.order=sequential", "model.vocab_size=1024",
                      f"data.path={data}", "train.steps=2", "train.checkpoint_every=2"),
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    _quiet(train, "train")
    _quiet(_k2jax("convert", "orbax-to-hf", "--checkpoint", f"{run}/checkpoints/2",
                  "--out", f"{gcs_bucket}/hf"), "convert orbax-to-hf")
    _quiet(_k2jax("convert", "hf-to-orbax", "--hf", f"{gcs_bucket}/hf",
                  "--out", f"{gcs_bucket}/weights"), "convert hf-to-orbax")
    _quiet(_k2jax("data", "batch", "--run-dir", run, "--step", "1",
                  "--out", f"{gcs_bucket}/batch.npy"), "data batch")

    names = gcs_server.list_objects(gcs_bucket + "/")
    # (data_order.json, written only by a spike rollback, is the same write_bytes_atomic upload
    # as config.yaml)
    for expected in ("run/config.yaml", "run/metrics.jsonl", "run/checkpoints/2/commit_success.txt",
                     "hf/config.json", "weights/k2jax_model.json", "batch.npy"):
        assert expected in names, (expected, names)
    assert any(n.startswith("data/.k2index/") for n in names), names
    assert not [n for n in names if ".tmp-" in n or ".part-" in n], names


# -- reading weights on gs:// --------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny HF checkpoint with its own tokenizer, and the same converted to k2jax weights."""
    from lm_eval_fixtures import build_checkpoint

    root = tmp_path_factory.mktemp("gs_weights")
    hf = build_checkpoint(root / "hf", max_positions=32)
    assert main(["convert", "hf-to-orbax", "--hf", str(hf), "--out", str(root / "orbax")]) == 0
    return root


def _out(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out


@pytest.mark.slow  # four generate runs, each compiling prefill and decode
def test_generate_and_compare_hf_from_gs_equal_local(gcs_server, gcs_bucket, weights, tmp_path,
                                                     capsys):
    fs = fsspec.filesystem("gs")
    fs.put(str(weights / "hf") + "/", f"{gcs_bucket}/hf/", recursive=True)
    prompts = ["--prompt", "the quick brown fox", "--max-new-tokens", "6", "--dtype", "fp32",
               "--json"]
    local = _out(capsys, ["generate", "--hf", str(weights / "hf"), *prompts])
    assert json.loads(local)["token_ids"]
    assert _out(capsys, ["generate", "--hf", f"{gcs_bucket}/hf", *prompts]) == local

    capsys.readouterr()
    assert main(["convert", "hf-to-orbax", "--hf", f"{gcs_bucket}/hf",
                 "--out", f"{gcs_bucket}/orbax"]) == 0
    capsys.readouterr()
    local = _out(capsys, ["generate", "--checkpoint", str(weights / "orbax"),
                          "--tokenizer", str(weights / "hf"), *prompts])
    assert _out(capsys, ["generate", "--checkpoint", f"{gcs_bucket}/orbax",
                         "--tokenizer", f"{gcs_bucket}/hf", *prompts]) == local

    import numpy as np

    ids = tmp_path / "ids.npy"
    np.save(ids, np.arange(3, 15, dtype=np.int32).reshape(1, 12))
    report = _out(capsys, ["compare-hf", "--hf", f"{gcs_bucket}/hf", "--token-ids", str(ids),
                           "--checkpoint", f"{gcs_bucket}/orbax"])
    assert report.strip().endswith("PASSED"), report


@pytest.mark.slow  # two lm-eval runs (it indexes its whole task library: ~15 s each)
def test_eval_tasks_from_gs_equals_local(gcs_server, gcs_bucket, weights, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval_fixtures import write_tasks

    fsspec.filesystem("gs").put(str(weights / "hf") + "/", f"{gcs_bucket}/hf/", recursive=True)
    task = write_tasks(tmp_path)[0]

    def table(hf: str) -> list[str]:
        out = _out(capsys, ["eval-tasks", "--model_args", f"hf={hf}", "--tasks", task,
                            "--include_path", str(tmp_path), "--limit", "4"])
        return [line for line in out.splitlines() if line.startswith("|")]

    local = table(str(weights / "hf"))
    assert any(task in line for line in local), local
    assert table(f"{gcs_bucket}/hf") == local
