"""Which JAX platform a k2jax command starts on when the user has not said: TPU > GPU > CPU.

With libtpu installed (the `tpu` extra, also used for ahead-of-time TPU compiles on CPU hosts),
JAX initialises its TPU backend first; on a machine without TPU chips that prints errors such as
"unexpected worker hostname" and then falls back to the CPU. With jax's CUDA plugin installed
(the `gpu` extra) on a host without an NVIDIA GPU, JAX warns that CUDA failed to initialise.
k2jax looks for the chips itself (TPU chips, then NVIDIA GPUs) and starts JAX on the first kind
it finds whose plugin is installed, else on the CPU. JAX_PLATFORMS set by the user always wins.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GOOGLE_PCI_VENDOR = "0x1ae0"  # every Cloud TPU chip is a PCI device of Google's
NVIDIA_PCI_VENDOR = "0x10de"
PCI_DISPLAY_CLASS = "0x03"  # 0x0300 VGA, 0x0302 3D controller (data-centre GPUs)
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


def nvidia_gpus_present(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
    """True if this host has an NVIDIA GPU: /dev/nvidia0.. (the driver loaded) or an NVIDIA PCI
    display/3D controller (a container that sees the PCI tree)."""
    if any(path.name[len("nvidia"):].isdigit() for path in Path(dev_root).glob("nvidia*")):
        return True
    for device in Path(sys_root, "bus", "pci", "devices").glob("*"):
        try:
            if ((device / "vendor").read_text().strip() == NVIDIA_PCI_VENDOR and
                    (device / "class").read_text().strip().startswith(PCI_DISPLAY_CLASS)):
                return True
        except OSError:
            continue
    return False


def choose_platform(environ=os.environ, sys_root: str = "/sys", dev_root: str = "/dev") -> None:
    """Set JAX_PLATFORMS for this process when the user has not: a TPU host is left to JAX (it
    takes the TPU), an NVIDIA GPU with jax's CUDA plugin gets "cuda,cpu", anything else "cpu"
    when a TPU or CUDA plugin is installed that would otherwise try (and warn).

    Must run before jax initialises a backend (the CLI calls it first thing)."""
    if environ.get("JAX_PLATFORMS") or tpu_chips_present(sys_root, dev_root):
        return
    libtpu = importlib.util.find_spec("libtpu") is not None
    cuda = any(importlib.util.find_spec(name) for name in CUDA_PLUGINS)
    if cuda and nvidia_gpus_present(sys_root, dev_root):
        environ["JAX_PLATFORMS"] = "cuda,cpu"
    elif libtpu or cuda:
        environ["JAX_PLATFORMS"] = "cpu"
    # neither plugin: JAX's own choice (the CPU) stands, silently
