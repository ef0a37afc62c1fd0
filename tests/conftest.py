"""Test-wide settings: CPU only (libtpu may be installed for AOT compiles, but no TPU is
attached), and float32 matmuls at full precision for the parity checks."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# AOT compiles load libtpu in this process and in `k2jax aot` subprocesses; libtpu's
# one-process lockfile (/tmp/libtpu_lockfile) guards a real chip, which no test has.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_configure(config):
    """One compilation cache per test session (this process only; deleted at exit): tests build
    fresh Trainers and jitted closures whose programs are the same, and XLA's compile dominates
    their CPU time (issue 16 point 8: test_reliability_train + test_train 69 -> 46 CPU s). A hit
    needs the same program, compile options and jax version, so it cannot change a result."""
    import atexit
    import shutil
    import tempfile

    import jax

    cache_dir = tempfile.mkdtemp(prefix="k2jax-test-xla-cache-")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


import pytest  # noqa: E402


def pytest_collection_finish(session):
    """Python's cyclic garbage collector, left alone, spent 91 of the quick group's 212 s
    (2026-12-07: 7,206 collections, each full one walking the ~1M objects that jax, torch and
    transformers leave once imported). Those objects live as long as the session: freeze them
    out of the collector's walks once the test modules are imported (165 s, 32 s of it in the
    collector). Garbage made by the tests is still collected; nothing a test computes
    changes."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS protocol server on 127.0.0.1 (tests/gcs_server.py), with this process's
    environment pointing gcsfs and TensorStore at it for the rest of the session; subprocesses
    inherit it."""
    from gcs_server import GCSServer, restore_environment, set_environment

    server = GCSServer(tmp_path_factory.mktemp("gcs")).start()
    previous = set_environment(server.environment())
    yield server
    restore_environment(previous)
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh, empty bucket on the local server: `gs://NAME`."""
    return gcs_server.bucket()
