"""The local GCS protocol server speaks to the clients k2jax uses (gcsfs through etils.epath,
TensorStore through Orbax) through the standard hooks only."""

import numpy as np


def test_epath_round_trip_and_gcs_has_no_empty_directories(gcs_server, gcs_bucket):
    from etils import epath

    root = epath.Path(gcs_bucket) / "run"
    root.mkdir(parents=True, exist_ok=True)
    assert not root.is_dir()  # GCS: a prefix exists only once an object is under it
    (root / "a.txt").write_text("hello")
    assert root.is_dir() and (root / "a.txt").read_text() == "hello"
    assert gcs_server.list_objects(gcs_bucket + "/run") == ["run/a.txt"]


def test_tensorstore_writes_where_gcsfs_reads(gcs_server, gcs_bucket):
    import tensorstore as ts

    bucket = gcs_bucket.removeprefix("gs://")
    spec = {"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": bucket, "path": "arr/"}}
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    store = ts.open(spec, create=True, dtype=ts.float32, shape=data.shape).result()
    store.write(data).result()
    assert np.array_equal(ts.open(spec).result().read().result(), data)
    assert any(name.startswith("arr/") for name in gcs_server.list_objects(gcs_bucket))
