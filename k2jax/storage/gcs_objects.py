"""What a run directory on `gs://` needs beyond files: GCS object operations through gcsfs.

GCS is not a file system: a prefix exists only once an object is under it (no empty
directories), an object cannot be appended to, a "directory" cannot be renamed in one step, and
there is no lock that dies with its holder. What it has instead, and what k2jax uses:
  exclusive create   an upload with ifGenerationMatch=0 fails when the object exists
  generations        every write of an object gets a new number; a write or delete can be made
                     conditional on the generation it read (ifGenerationMatch)
  compose            a new object made of existing ones, server-side and atomically, which is
                     how a log is appended to (`append_object`)
Plain files (reads, whole uploads, listing, trees) are k2jax/storage/remote.py's.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Optional

from k2jax.storage.remote import filesystem, split

# Composite objects may hold at most 1024 components; past this many the log is rewritten whole
# (once per ~1000 appends) so that composing can go on.
_MAX_COMPONENTS = 1000


def stat(path: str | os.PathLike) -> Optional[dict]:
    """{'generation': int, 'updated': datetime (UTC), 'components': int} of an object; None when
    there is none."""
    bucket, key = split(path)
    fs, _ = filesystem(path)
    try:
        info = fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)
    except FileNotFoundError:
        return None
    updated = datetime.datetime.fromisoformat(info["updated"].replace("Z", "+00:00"))
    return {"generation": int(info["generation"]), "updated": updated,
            "components": int(info.get("componentCount", 1))}


def read(path: str | os.PathLike, generation: Optional[int] = None) -> Optional[bytes]:
    """The object's bytes (at `generation` if given), None when there is none."""
    bucket, key = split(path)
    try:
        _, body = filesystem(path)[0].call("GET", "b/{}/o/{}", bucket, key, alt="media",
                                    **({"generation": generation} if generation else {}))
    except FileNotFoundError:
        return None
    return body


def write(path: str | os.PathLike, data: bytes, if_generation: Optional[int] = None) -> int:
    """Uploads `data` as the object; with `if_generation` only while the object is at that
    generation (0: only when there is none). Returns the new generation; a precondition that
    does not hold raises FileExistsError."""
    bucket, key = split(path)
    fs, _ = filesystem(path)
    extra = {} if if_generation is None else {"ifGenerationMatch": str(if_generation)}
    # A multipart upload (metadata + bytes), as gcsfs makes: the form whose preconditions the
    # local test server also checks.
    body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
            + json.dumps({"name": key}).encode()
            + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + data + b"\n--==0==--")
    try:
        reply = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket,
                        uploadType="multipart", data=body, json_out=True,
                        headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                        **extra)
    except FileExistsError:
        raise
    except Exception as err:
        if "412" in str(err) or "Precondition" in str(err):
            raise FileExistsError(f"{os.fspath(path)}: changed by another writer") from err
        raise
    fs.invalidate_cache(f"{bucket}/{key}")
    return int(reply["generation"])


def delete(path: str | os.PathLike, if_generation: Optional[int] = None) -> bool:
    """Deletes the object (only at `if_generation` if given); False when it was not there or
    the precondition did not hold."""
    bucket, key = split(path)
    fs, _ = filesystem(path)
    extra = {} if if_generation is None else {"ifGenerationMatch": str(if_generation)}
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, **extra)
    except FileNotFoundError:
        return False
    except Exception as err:
        if "412" in str(err) or "Precondition" in str(err):
            return False
        raise
    fs.invalidate_cache(f"{bucket}/{key}")
    return True


def append_object(path: str | os.PathLike, data: bytes, part_name: str) -> None:
    """Appends `data` to the object at `path` (created when absent): `data` is uploaded as the
    object `part_name` beside it, composed onto the end of `path` in one server-side step, and
    deleted. A kill at any point leaves `path` with or without the whole of `data`, never
    half of it (a leftover part object is harmless and overwritten by the next append)."""
    if not data:
        return
    fs, _ = filesystem(path)
    bucket, key = split(path)
    folder = key.rpartition("/")[0]
    part_key = f"{folder}/{part_name}" if folder else part_name
    current = stat(path)
    if current is None:
        write(path, data)
        return
    if current["components"] >= _MAX_COMPONENTS:  # compose limit: start a one-piece object
        write(path, (read(path) or b"") + data, if_generation=current["generation"])
        return
    write(f"gs://{bucket}/{part_key}", data)
    fs.merge(f"{bucket}/{key}", [f"{bucket}/{key}", f"{bucket}/{part_key}"])
    fs.invalidate_cache(f"{bucket}/{key}")
    delete(f"gs://{bucket}/{part_key}")
