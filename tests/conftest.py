"""Test-wide settings: CPU only (libtpu may be installed for AOT compiles, but no TPU is
attached), and float32 matmuls at full precision for the parity checks."""

import os

from k2jax.runtime import configure_xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
configure_xla_flags()  # the same XLA flags as the `k2jax` command, so results match it bitwise
