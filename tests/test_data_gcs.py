"""`k2jax data ...` with data, index dirs and outputs on gs://, against the local GCS protocol
server (tests/gcs_server.py): the same bytes as on local disk, ranged reads per step, and one
line naming the path for a missing bucket, a missing object or no permission."""

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_fixtures import SEQ_LEN, write_chunk
from test_data_prepare import spm_model  # noqa: F401  (a tiny SentencePiece model fixture)
from k2jax.cli import main

NUM_CHUNKS = 5


def lines_of(chunk_id: int) -> int:
    return 3 + chunk_id % 3


@pytest.fixture
def local_chunks(tmp_path) -> Path:
    directory = tmp_path / "chunks"
    directory.mkdir()
    for chunk_id in range(NUM_CHUNKS):
        write_chunk(directory, chunk_id, lines_of(chunk_id), masked_lines=(1,))
    return directory


def upload(local: Path, url: str) -> None:
    """Plain gcsfs (not k2jax) puts the files on the server."""
    fs = fsspec.filesystem("gs")
    for path in sorted(local.iterdir()):
        if path.is_file():
            fs.put_file(str(path), f"{url}/{path.name}")


def run(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def batch(capsys, data, step, out, *extra):
    return run(capsys, "batch", "--data", data, "--step", step, "--global-batch", 4,
               "--seq-len", SEQ_LEN, "--order", "sequential", "--out", out, *extra)


@pytest.mark.slow  # ~9 s; the local path stays quick (test_data_cli)
def test_index_batch_locate_pack_on_gs_equal_local(gcs_server, gcs_bucket, local_chunks,
                                                   tmp_path, capsys):
    data = f"{gcs_bucket}/data"
    upload(local_chunks, data)
    assert run(capsys, "index", local_chunks, "--quiet")[0] == 0
    code, out, err = run(capsys, "index", data, "--quiet")
    assert code == 0 and "indexed 5 files" in out, err
    for chunk_id in range(NUM_CHUNKS):  # the offsets are the same bytes
        name = f".k2index/chunk_{chunk_id}.offsets.npy"
        assert gcs_server.read_object(f"{data}/{name}") == (local_chunks / name).read_bytes()
    assert "skipped 5 already indexed" in run(capsys, "index", data, "--quiet")[1]

    for step in range(4):  # 16 rows of 19: every chunk boundary, masked lines included
        assert batch(capsys, local_chunks, step, tmp_path / f"local{step}.npy")[0] == 0
        code, _, err = batch(capsys, data, step, f"{gcs_bucket}/out/b{step}.npy")
        assert code == 0, err
        assert gcs_server.read_object(f"{gcs_bucket}/out/b{step}.npy") == \
            (tmp_path / f"local{step}.npy").read_bytes()

    locate = ("locate", "--step", 2, "--global-batch", 4, "--seq-len", SEQ_LEN, "--order",
              "sequential", "--data")
    local_located = json.loads(run(capsys, *locate, local_chunks)[1])
    gs_located = json.loads(run(capsys, *locate, data)[1])
    assert [{k: v for k, v in p.items() if k != "file"} for p in gs_located["pieces"]] == \
        [{k: v for k, v in p.items() if k != "file"} for p in local_located["pieces"]]
    assert gs_located["pieces"][0]["file"].startswith(data + "/chunk_")

    pack = ("--seq-len", SEQ_LEN, "--quiet")
    assert run(capsys, "pack", "--data", local_chunks, "--out", tmp_path / "packed", *pack)[0] == 0
    code, _, err = run(capsys, "pack", "--data", data, "--out", f"{gcs_bucket}/packed", *pack,
                       "--workers", 2)  # worker processes spawned: gcsfs is not fork-safe
    assert code == 0, err
    for name in ("chunk_3.tokens.u16", "chunk_3.mask.u8"):
        assert gcs_server.read_object(f"{gcs_bucket}/packed/{name}") == \
            (tmp_path / "packed" / name).read_bytes()
    assert batch(capsys, tmp_path / "packed", 3, tmp_path / "lp.npy", "--format", "packed")[0] == 0
    assert batch(capsys, f"{gcs_bucket}/packed", 3, tmp_path / "gp.npy", "--format",
                 "packed")[0] == 0
    assert (tmp_path / "gp.npy").read_bytes() == (tmp_path / "lp.npy").read_bytes()
    assert not [n for n in gcs_server.list_objects(gcs_bucket) if ".tmp-" in n]


def test_index_dir_on_gs_for_local_data_and_generation_staleness(gcs_server, gcs_bucket,
                                                                 local_chunks, tmp_path, capsys):
    index_dir = f"{gcs_bucket}/index"
    code, _, err = run(capsys, "index", local_chunks, "--index-dir", index_dir, "--quiet")
    assert code == 0, err
    assert batch(capsys, local_chunks, 1, tmp_path / "a.npy", "--index-dir", index_dir)[0] == 0
    assert run(capsys, "index", local_chunks, "--quiet")[0] == 0
    assert batch(capsys, local_chunks, 1, tmp_path / "b.npy")[0] == 0
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()

    # An object rewritten with the same size in the same second is stale by its generation.
    data = f"{gcs_bucket}/data"
    upload(local_chunks, data)
    assert run(capsys, "index", data, "--quiet")[0] == 0
    original = (local_chunks / "chunk_0.jsonl").read_bytes()
    changed = original.replace(b'"source": "test"', b'"source": "tesT"', 1)
    assert len(changed) == len(original) and changed != original
    fsspec.filesystem("gs").pipe_file(f"{data}/chunk_0.jsonl", changed)
    code, _, err = batch(capsys, data, 0, tmp_path / "c.npy")
    assert code == 2 and "index is stale" in err and err.count("\n") == 1


def test_prepare_writes_the_same_chunks_to_gs(gcs_server, gcs_bucket, tmp_path, capsys):
    import sentencepiece

    sentences = [f"row {i} of the tiny corpus with some words" for i in range(120)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "tok"), vocab_size=300,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", minloglevel=2)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    args = ("--tokenizer", tmp_path / "tok.model", "--input", docs, "--num-chunks", 2,
            "--seq-len", 32, "--quiet")
    assert run(capsys, "prepare", *args, "--out", tmp_path / "chunks")[0] == 0
    code, _, err = run(capsys, "prepare", *args, "--out", f"{gcs_bucket}/chunks")
    assert code == 0, err
    local = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "chunks").rglob("*")
                   if p.is_file())  # the chunks, prepare.json and the index prepare writes
    assert sorted(gcs_server.list_objects(f"{gcs_bucket}/chunks")) == local
    for name in ("chunk_0.jsonl", "chunk_1.jsonl"):
        assert gcs_server.read_object(f"{gcs_bucket}/chunks/{name}") == \
            (tmp_path / "chunks" / name).read_bytes()


@contextlib.contextmanager
def clients_pointed_at(endpoint: str):
    """This process's gcsfs talks to `endpoint` inside the block (fsspec caches filesystem
    instances, which read the endpoint when made: the cache is emptied on the way in and out)."""
    from gcs_server import client_environment, restore_environment, set_environment

    fs_class = type(fsspec.filesystem("gs"))
    previous = set_environment(client_environment(endpoint))
    fs_class.clear_instance_cache()
    try:
        yield
    finally:
        restore_environment(previous)
        fs_class.clear_instance_cache()


def test_rows_come_from_ranged_reads(gcs_server, gcs_bucket, tmp_path):
    """Bytes on the wire per row, counted by a forwarder in front of the server: a step costs
    its rows' bytes plus HTTP overhead, never the chunk file."""
    from counting_proxy import CountingProxy
    from k2jax.data.chunk_index import ChunkIndex, build_index
    from k2jax.data.jsonl_source import JsonlChunkReader

    seq_len = 256
    write_chunk(tmp_path, 0, 2000, seq_len=seq_len)  # ~2 MB: far larger than a step
    size = (tmp_path / "chunk_0.jsonl").stat().st_size
    data = f"{gcs_bucket}/ranged"
    upload(tmp_path, data)
    build_index(data, progress=False)

    proxy = CountingProxy(gcs_server.port)
    try:
        with clients_pointed_at(proxy.endpoint):
            reader = JsonlChunkReader(ChunkIndex(data, [0]), seq_len, 32032)
            reader.index.offsets(0)
            proxy.reset()
            tokens, _ = reader.read_lines(0, np.arange(1000, 1008))
            downloaded = proxy.reset()
            tokens_far, _ = reader.read_lines(0, np.array([7, 8, 1500]))  # two runs: two GETs
            downloaded_far = proxy.reset()
    finally:
        proxy.stop()
    assert tokens[:, :2].tolist() == [[0, line] for line in range(1000, 1008)]
    assert tokens_far[:, 1].tolist() == [7, 8, 1500]
    row_bytes = size / 2000
    assert 8 * row_bytes < downloaded < 8 * row_bytes + 4096, (downloaded, row_bytes, size)
    assert 3 * row_bytes < downloaded_far < 3 * row_bytes + 8192, (downloaded_far, row_bytes)


class Forbidden(BaseHTTPRequestHandler):
    """A GCS endpoint that refuses everything, as GCS does a caller without access."""

    def _deny(self):
        body = json.dumps({"error": {"code": 403, "message": "caller does not have "
                                     "storage.objects.list access"}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _deny

    def log_message(self, *args):
        pass


def test_missing_bucket_object_and_permission_are_one_line(gcs_server, gcs_bucket,
                                                           local_chunks, tmp_path, capsys):
    code, _, err = run(capsys, "index", "gs://no-such-bucket-k2jax/data", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "gs://no-such-bucket-k2jax/data" in err

    data = f"{gcs_bucket}/data"
    upload(local_chunks, data)
    assert run(capsys, "index", data, "--quiet")[0] == 0
    fsspec.filesystem("gs").rm_file(f"{data}/chunk_2.jsonl")
    with clients_pointed_at(gcs_server.endpoint):  # a fresh listing cache, as a new process has
        code, _, err = run(capsys, "batch", "--data", data, "--step", 0, "--global-batch", 4,
                           "--seq-len", SEQ_LEN, "--order", "0,1,2,3,4", "--out",
                           tmp_path / "x.npy")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{data}/chunk_2.jsonl" in err and not (tmp_path / "x.npy").exists()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with clients_pointed_at(f"http://127.0.0.1:{server.server_address[1]}"):
            code, _, err = run(capsys, "index", f"{gcs_bucket}/data", "--quiet")
    finally:
        server.shutdown()
    assert code == 2 and err.count("\n") == 1 and "permission denied" in err, err
    assert gcs_bucket in err


@pytest.mark.slow
def test_training_reads_its_rows_from_gs(gcs_server, gcs_bucket, tmp_path):
    """configs/tiny.yaml (small model) on K2-format chunks on gs://: the same losses, step for
    step, as the same chunks on local disk."""
    from train_utils import losses_by_step, run_train

    local = tmp_path / "chunks"
    local.mkdir()
    for chunk_id in range(3):
        write_chunk(local, chunk_id, 12, seq_len=16, masked_lines=(2, 5))
    data = f"{gcs_bucket}/train-data"
    upload(local, data)
    for directory in (local, data):
        assert main(["data", "index", str(directory), "--quiet"]) == 0
    common = ("data.source=k2", "data.order=sequential", "data.use_tgt_mask=true",
              "model.vocab_size=1000", "train.steps=3", "train.checkpoint_every=100",
              "data.prefetch=2")
    results = {}
    for name, path in (("local", local), ("gs", data)):
        result = run_train(tmp_path / f"run_{name}", f"data.path={path}", *common)
        assert result.returncode == 0, result.stderr[-2000:]
        results[name] = losses_by_step(tmp_path / f"run_{name}")
    assert len(results["gs"]) == 3  # train.log_every=1
    assert results["gs"] == results["local"]


def test_prepare_chat_writes_the_same_chunks_to_gs(gcs_server, gcs_bucket, tmp_path, spm_model):
    from test_chat_sft import CHAT, CONVERSATIONS, SEQ, write_jsonl
    from k2jax.data.chat import chat_tokenizer, prepare_chat

    tok = chat_tokenizer(spm_model, CHAT)
    path = write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)
    prepare_chat(tok, [path], tmp_path / "local", CHAT, SEQ, vocab_size=336)
    prepare_chat(tok, [path], f"{gcs_bucket}/chat", CHAT, SEQ, vocab_size=336)
    local = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(n.split("/", 1)[1] for n in gcs_server.list_objects(f"{gcs_bucket}/chat/")) \
        == local
    for name in local:
        if name.endswith(".json"):  # the summary names its output directory
            continue
        assert gcs_server.read_object(f"{gcs_bucket}/chat/{name}") == \
            (tmp_path / "local" / name).read_bytes(), name


def test_ranged_reader_reads_in_pieces(gcs_server, gcs_bucket):
    from k2jax.storage.ranged_reader import RangedReader
    from k2jax.storage.remote import filesystem

    data = bytes(range(256)) * 1000
    fsspec.filesystem("gs").pipe_file(f"{gcs_bucket}/blob", data)
    url = f"{gcs_bucket}/blob"
    with RangedReader(url, *filesystem(url), piece_bytes=1000) as f:  # 200 GETs for one read
        f.seek(300)
        buffer = bytearray(200_000)
        assert f.readinto(buffer) == 200_000 and bytes(buffer) == data[300:200_300]
        assert f.read(10) == data[200_300:200_310]
        f.seek(-5, 2)
        assert f.read() == data[-5:] and f.read(3) == b""


def test_gcsfs_errors_name_the_gs_path(gcs_server, gcs_bucket):
    """gcsfs's own errors name API requests; the CLI's mapping turns them back into the path."""
    from k2jax.storage_errors import path_failure

    fs = fsspec.filesystem("gs")
    with pytest.raises(FileNotFoundError) as missing:
        fs.cat_file(f"{gcs_bucket}/dir/no such.jsonl", start=0, end=10)
    assert path_failure(missing.value) == \
        f"{gcs_bucket}/dir/no such.jsonl: not found (no such object or bucket)"
    with pytest.raises(FileNotFoundError) as no_bucket:
        fs.info("gs://no-such-bucket-k2jax/x")
    assert path_failure(no_bucket.value).startswith("gs://no-such-bucket-k2jax")
