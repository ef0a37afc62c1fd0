"""Test-wide settings: CPU only (libtpu may be installed for AOT compiles, but no TPU is
attached), and float32 matmuls at full precision for the parity checks."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
