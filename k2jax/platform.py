"""Which JAX platform a k2jax command starts on when the user has not said.

With libtpu installed (the `tpu` extra, also used for ahead-of-time TPU compiles on CPU hosts),
JAX initialises its TPU backend first; on a machine without TPU chips that prints errors such as
"unexpected worker hostname" and then falls back to the CPU. k2jax looks for TPU chips itself
and, when there are none, starts JAX without the TPU platform. JAX_PLATFORMS set by the user
always wins.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # every Cloud TPU chip is a PCI device of Google's
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")


def tpu_chips_present(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
    """True if this host has TPU chips: /dev/accel* (v2-v5p) or a Google PCI device (v5e, v6e
    use VFIO, /dev/vfio/N)."""
    if any(Path(dev_root).glob("accel*")):
        return True
    for vendor in Path(sys_root, "bus", "pci", "devices").glob("*/vendor"):
        try:
            if vendor.read_text().strip() == GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def choose_platform(environ=os.environ, sys_root: str = "/sys", dev_root: str = "/dev") -> None:
    """Set JAX_PLATFORMS for this process when the user has not and no TPU chip is present.

    Must run before jax initialises a backend (the CLI calls it first thing)."""
    if environ.get("JAX_PLATFORMS") or tpu_chips_present(sys_root, dev_root):
        return
    if importlib.util.find_spec("libtpu") is None:
        return  # no libtpu, no noise: JAX's own choice (CUDA if installed, else CPU) stands
    cuda = any(importlib.util.find_spec(name) for name in CUDA_PLUGINS)
    environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"
