"""k2jax/files.py: the readers of the small files k2jax writes, local and gs://."""

import numpy as np
import pytest

from k2jax.atomic_write import atomic_file, write_bytes_atomic, write_npy_atomic
from k2jax.errors import UserError
from k2jax.files import read_json, read_json_object, read_npy, read_yaml


def test_missing_is_none_and_damage_is_one_line_naming_the_file(tmp_path):
    assert read_json(tmp_path / "absent.json") is None and read_yaml(tmp_path / "a.yaml") is None
    (tmp_path / "bad.json").write_text('{"a": [1,')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON \(.* at line 1\); fix it$"):
        read_json(tmp_path / "bad.json", "fix it")
    with pytest.raises(UserError, match=r"bad.json: not a run record \("):
        read_json(tmp_path / "bad.json", what="a run record")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(UserError, match="list.json: expected a JSON object, found list"):
        read_json_object(tmp_path / "list.json")
    (tmp_path / "bad.yaml").write_text("a: [1,")
    with pytest.raises(UserError, match=r"bad.yaml: not valid YAML \(\w+\)"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UserError, match="dir.json: is a directory, expected a JSON file"):
        read_json(tmp_path / "dir.json")
    (tmp_path / "short.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(UserError, match="short.npy: not a complete .npy array"):
        read_npy(tmp_path / "short.npy")


def test_round_trips_through_gcs(gcs_bucket):
    from etils import epath

    write_bytes_atomic(gcs_bucket + "/d/a.json", b'{"x": 1}')
    write_bytes_atomic(gcs_bucket + "/d/a.yaml", b"x: [1, 2]\n")
    write_npy_atomic(gcs_bucket + "/d/a.npy", np.arange(5, dtype=np.int64))
    root = epath.Path(gcs_bucket) / "d"
    assert read_json_object(root / "a.json") == {"x": 1}
    assert read_yaml(root / "a.yaml") == {"x": [1, 2]}
    assert read_npy(root / "a.npy").tolist() == [0, 1, 2, 3, 4]
    assert read_json(root / "absent.json") is None
    with pytest.raises(RuntimeError):  # an error inside the block uploads nothing
        with atomic_file(gcs_bucket + "/d/half.json") as f:
            f.write(b'{"half"')
            raise RuntimeError("interrupted")
    assert read_json(root / "half.json") is None
