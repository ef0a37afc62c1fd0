"""Test-wide settings: CPU only (libtpu may be installed for AOT compiles, but no TPU is
attached), and float32 matmuls at full precision for the parity checks."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
