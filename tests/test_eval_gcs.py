"""eval-loss with its weights (Hugging Face or k2jax) and its data on gs:// (the local GCS
server) gives the same losses as from local disk: the readers eval-loss, generate, eval-tasks
and compare-hf share (hf_reader, params_io/orbax, the chunk loader) all speak gs://."""

import json

import fsspec
import pytest

import eval_fixtures as fx
from k2jax.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("eval"))


def losses(capsys, *args):
    code = main(["eval-loss", *map(str, args), "--order", "0,1", "--seq-len", str(fx.SEQ),
                 "--global-batch", str(fx.GLOBAL_BATCH), "--steps", "0:2", "--json",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [{k: v for k, v in json.loads(line).items() if "second" not in k and "time" not in k}
            for line in out.splitlines()]


@pytest.mark.slow  # ~25 s: two eval-loss runs of two weights forms
def test_eval_loss_from_gs_equals_local(gcs_server, gcs_bucket, setup, capsys):
    fs = fsspec.filesystem("gs")
    for name in ("hf", "orbax"):
        fs.put(str(setup[name]) + "/", f"{gcs_bucket}/{name}/", recursive=True)
    for path in sorted(setup["data"].glob("chunk_*.jsonl")):
        fs.put_file(str(path), f"{gcs_bucket}/data/{path.name}")
    assert main(["data", "index", f"{gcs_bucket}/data", "--quiet"]) == 0
    capsys.readouterr()

    for weights in ("--hf", "--checkpoint"):
        name = "hf" if weights == "--hf" else "orbax"
        local = losses(capsys, weights, setup[name], "--data", setup["data"])
        remote = losses(capsys, weights, f"{gcs_bucket}/{name}", "--data", f"{gcs_bucket}/data")
        assert len(local) == 2 and "loss" in local[0] and remote == local, (local, remote)
