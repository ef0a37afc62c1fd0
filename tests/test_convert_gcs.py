"""`k2jax convert` through gs:// (the local GCS protocol server): the same bytes as a local
conversion both ways, a completion marker written last, and one-line errors."""

import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import fsspec
import numpy as np
import pytest

from convert_fixtures import hf_config, hf_state, tiny_hf_model, write_hf_dir
from k2jax.cli import main
from test_data_gcs import Forbidden, clients_pointed_at


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = tiny_hf_model()
    return write_hf_dir(tmp_path_factory.mktemp("hf") / "hf", hf_state(model), hf_config(model),
                        shards=2)


def convert(capsys, *argv):
    code = main(["convert", *map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def remote_files_of(gcs_server, url):
    prefix = url.removeprefix("gs://").partition("/")[2] + "/"
    return {name[len(prefix):]: gcs_server.read_object(f"{url.split('/')[0]}//"
                                                       f"{url.split('/')[2]}/{name}")
            for name in gcs_server.list_objects(url + "/")}


def local_files_of(directory):
    return {os.path.relpath(os.path.join(root, name), directory):
            open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


@pytest.mark.slow  # ~5 s; local conversion stays quick (test_convert)
def test_both_directions_through_gs_equal_local(gcs_server, gcs_bucket, hf_dir, tmp_path,
                                               capsys):
    # HF (local) -> weights on gs:// ; HF on gs:// -> weights (local)
    assert convert(capsys, "hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "w")[0] == 0
    code, _, err = convert(capsys, "hf-to-orbax", "--hf", hf_dir, "--out", f"{gcs_bucket}/w")
    assert code == 0, err
    fsspec.filesystem("gs").put(str(hf_dir) + "/", f"{gcs_bucket}/hf/", recursive=True)
    code, _, err = convert(capsys, "hf-to-orbax", "--hf", f"{gcs_bucket}/hf", "--out",
                           tmp_path / "w2")
    assert code == 0, err

    # weights -> HF, each of the three weights directories, out local and on gs://
    assert convert(capsys, "orbax-to-hf", "--checkpoint", tmp_path / "w", "--out",
                   tmp_path / "hf_local")[0] == 0
    expected = local_files_of(tmp_path / "hf_local")
    code, _, err = convert(capsys, "orbax-to-hf", "--checkpoint", f"{gcs_bucket}/w", "--out",
                           f"{gcs_bucket}/hf_out")
    assert code == 0, err
    assert remote_files_of(gcs_server, f"{gcs_bucket}/hf_out") == expected
    assert convert(capsys, "orbax-to-hf", "--checkpoint", tmp_path / "w2", "--out",
                   tmp_path / "hf_from_w2")[0] == 0
    assert local_files_of(tmp_path / "hf_from_w2") == expected

    # the weights written to gs:// read back as the local ones do, tensor for tensor
    from k2jax.convert.orbax_reader import OrbaxParamsReader
    from k2jax.hf import name_map

    local, remote = OrbaxParamsReader(str(tmp_path / "w")), OrbaxParamsReader(f"{gcs_bucket}/w")
    local.check(), remote.check()
    for name, mapping, layer in name_map.hf_names(local.config):
        a_future, a = local.start_read_hf(mapping, layer, np.empty(0, np.uint8))
        b_future, b = remote.start_read_hf(mapping, layer, np.empty(0, np.uint8))
        a_future.result(), b_future.result()
        assert a.tobytes() == b.tobytes(), name

    # what train.init_from, eval-loss and generate restore (params_io.restore_params)
    import jax
    from test_convert import restore

    local_config, local_params = restore(tmp_path / "w")
    remote_config, remote_params = restore(f"{gcs_bucket}/w")
    assert remote_config == local_config
    for a, b in zip(jax.tree.leaves(local_params), jax.tree.leaves(remote_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # an existing output needs --force, which replaces it
    code, _, err = convert(capsys, "orbax-to-hf", "--checkpoint", tmp_path / "w", "--out",
                           f"{gcs_bucket}/hf_out")
    assert code == 2 and "exists; --force replaces it" in err and err.count("\n") == 1
    code, _, err = convert(capsys, "orbax-to-hf", "--checkpoint", tmp_path / "w", "--out",
                           f"{gcs_bucket}/hf_out", "--force", "--dtype", "fp32")
    assert code == 0, err
    assert b'"torch_dtype": "float32"' in gcs_server.read_object(f"{gcs_bucket}/hf_out/config.json")


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_marker(gcs_server, gcs_bucket, hf_dir, tmp_path):
    """SIGKILL in the middle of writing shards: no config.json, so nothing reads it as done."""
    out = f"{gcs_bucket}/killed"
    subprocess.run([sys.executable, "-m", "k2jax.cli", "convert", "hf-to-orbax", "--hf", hf_dir,
                    "--out", tmp_path / "w", "--no-progress"], check=True, timeout=300)
    script = ("import os, signal, k2jax.convert.hf_writer as w\n"
              "real = w.safetensors_header\n"
              "def header(shard):\n"
              "    if getattr(header, 'seen', False): os.kill(os.getpid(), signal.SIGKILL)\n"
              "    header.seen = True\n"
              "    return real(shard)\n"
              "w.safetensors_header = header\n"
              "from k2jax.cli import main\n"
              f"main(['convert', 'orbax-to-hf', '--checkpoint', {str(tmp_path / 'w')!r}, "
              f"'--out', {out!r}, '--shard-size', '20KB', '--no-progress'])\n")
    result = subprocess.run([sys.executable, "-c", script], timeout=300)
    assert result.returncode == -9
    names = gcs_server.list_objects(out + "/")
    assert "killed/config.json" not in names
    code = main(["convert", "hf-to-orbax", "--hf", out, "--out", str(tmp_path / "again"),
                 "--no-progress"])
    assert code == 2 and not (tmp_path / "again").exists()


def test_missing_bucket_object_and_permission_are_one_line(gcs_server, gcs_bucket, hf_dir,
                                                           tmp_path, capsys):
    code, _, err = convert(capsys, "orbax-to-hf", "--checkpoint", "gs://no-such-bucket-k2/w",
                           "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "gs://no-such-bucket-k2/w: not found" in err
    code, _, err = convert(capsys, "hf-to-orbax", "--hf", f"{gcs_bucket}/nothing", "--out",
                           tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and f"{gcs_bucket}/nothing: not found" in err
    code, _, err = convert(capsys, "hf-to-orbax", "--hf", hf_dir, "--out", gcs_bucket,
                           "--force")  # never a whole bucket
    assert code == 2 and "expected a directory inside a bucket" in err
    fsspec.filesystem("gs").put(str(hf_dir) + "/", f"{gcs_bucket}/hf/", recursive=True)
    fsspec.filesystem("gs").rm_file(f"{gcs_bucket}/hf/model-00002-of-00002.safetensors")
    with clients_pointed_at(gcs_server.endpoint):  # a fresh listing cache
        code, _, err = convert(capsys, "hf-to-orbax", "--hf", f"{gcs_bucket}/hf", "--out",
                               tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "model-00002-of-00002.safetensors" in err

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with clients_pointed_at(f"http://127.0.0.1:{server.server_address[1]}"):
            code, _, err = convert(capsys, "hf-to-orbax", "--hf", f"{gcs_bucket}/hf", "--out",
                                   tmp_path / "o")
    finally:
        server.shutdown()
    assert code == 2 and err.count("\n") == 1, err
    assert f"{gcs_bucket}/hf" in err and "permission denied" in err
    assert not (tmp_path / "o").exists()


def test_training_checkpoint_on_gs_exports_like_a_local_one(gcs_server, gcs_bucket, hf_dir,
                                                            tmp_path, capsys):
    """A training checkpoint step directory (Orbax's OCDBT layout, `state` item) saved to gs://
    by k2jax's own RunCheckpoints exports the same files as the same checkpoint saved locally."""
    import dataclasses

    import jax

    from k2jax.checkpoint.manager import RunCheckpoints
    from k2jax.config import TrainConfig
    from test_convert import restore

    assert convert(capsys, "hf-to-orbax", "--hf", hf_dir, "--out", tmp_path / "w")[0] == 0
    config, params = restore(tmp_path / "w")
    state = {"step": np.int32(7), "params": params,
             "opt_state": {"mu": jax.tree.map(lambda p: p + 1.0, params)}}
    for run_dir in (str(tmp_path / "run"), f"{gcs_bucket}/run"):
        run = RunCheckpoints(run_dir, TrainConfig())
        run.save(7, state, {"model": dataclasses.asdict(config)}, {"step": 7})
        run.wait()
        run.close()
    assert convert(capsys, "orbax-to-hf", "--checkpoint", tmp_path / "run/checkpoints/7",
                   "--out", tmp_path / "export")[0] == 0
    code, _, err = convert(capsys, "orbax-to-hf", "--checkpoint",
                           f"{gcs_bucket}/run/checkpoints/7", "--out", f"{gcs_bucket}/export")
    assert code == 0, err
    assert remote_files_of(gcs_server, f"{gcs_bucket}/export") == \
        local_files_of(tmp_path / "export")
