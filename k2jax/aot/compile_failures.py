"""What a failed TPU compile means: the compiler's own HBM figure when a plan does not fit
(reported, not raised: `k2jax aot` says DOES NOT FIT), or one line for a kernel over its scoped
VMEM (a setting of the config to change)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

_SUFFIX = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


def oom_bytes(message: str) -> Optional[int]:
    """Bytes the compiler says it needs, from a TPU compile-time HBM OOM error (else None).
    libtpu words it two ways: "memory required for HLO temporaries (3.69T) exceeds ..." and,
    for a plan just over, "Ran out of memory in memory space hbm. Used 31.32G of 31.25G hbm"."""
    if "Ran out of memory" not in message:
        return None
    match = (re.search(r"memory required for [^(]*\(([\d.]+)([KMGT]?)\)", message)
             or re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", message))
    if not match:
        return None
    return int(float(match.group(1)) * _SUFFIX[match.group(2)])


def vmem_oom_line(message: str) -> Optional[str]:
    """One line for a kernel that needs more scoped VMEM than the compile allows (a setting of
    the config: the limit flag or the kernel's blocks), from libtpu's error; else None."""
    if "CompileTimeScopedVmemOom" not in message and "memory space vmem" not in message:
        return None
    kernel = re.search(r"allocating on stack for %([\w.-]+)", message)
    sizes = re.search(r"size ([\d.]+[KMG]?) and limit ([\d.]+[KMG]?)", message)
    need = f" ({sizes.group(1)}B needed, limit {sizes.group(2)}B)" if sizes else ""
    return (f"train.xla_flags: the TPU compile ran out of scoped VMEM in "
            f"{kernel.group(1) if kernel else 'a kernel'}{need}: raise the limit with "
            f"--xla_tpu_scoped_vmem_limit_kib=N in train.xla_flags (MaxText's v6e recipes set "
            f"98304), or use smaller model.attention_block_* / attention_backward_blocks")


@dataclasses.dataclass
class OomMemory:
    """memory_analysis() stand-in when the compile failed for lack of HBM."""

    temp_size_in_bytes: int
    argument_size_in_bytes: int = 0
    output_size_in_bytes: int = 0
    alias_size_in_bytes: int = 0
