"""Process-wide XLA settings, applied before JAX starts its backends.

On CPU, XLA's default Eigen matmuls run transposed operands (every weight gradient) at about
half the speed of oneDNN's; `--xla_cpu_use_onednn=true` makes fp32 training about 1.4x faster
here (docs/performance.md). The flag only touches the CPU backend, so TPU runs are unaffected.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_use_onednn=true",)


def configure_xla_flags() -> None:
    """Append k2jax's XLA flags to XLA_FLAGS unless the user already set them."""
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
