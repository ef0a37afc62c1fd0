"""The one table of floating-point dtype names k2jax reads and writes.

Each dtype has four spellings: its name ("bfloat16": what ModelConfig.param_dtype, Hugging
Face's config.json `torch_dtype`, zarr3 metadata and `jnp.dtype` use), the CLI's short name
("bf16", as in `--dtype bf16`), its safetensors header code ("BF16") and its numpy dtype.
Wherever a dtype name is parsed, both the name and the short name are accepted.

Only numpy, ml_dtypes and k2jax.errors are imported, so config.py and the converters can both
use this module without a cycle.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import ml_dtypes
import numpy as np

from k2jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class DType:
    name: str  # "bfloat16"
    short: str  # "bf16"
    safetensors: str  # "BF16"
    numpy: np.dtype


TABLE: tuple[DType, ...] = (
    DType("float32", "fp32", "F32", np.dtype(np.float32)),
    DType("bfloat16", "bf16", "BF16", np.dtype(ml_dtypes.bfloat16)),
    DType("float16", "fp16", "F16", np.dtype(np.float16)),
)
FLOAT32, BFLOAT16, FLOAT16 = TABLE


def find(name: str) -> Optional[DType]:
    """The dtype called `name` ("bfloat16" or "bf16"), or None."""
    return next((d for d in TABLE if name in (d.name, d.short)), None)


def spellings(allowed: Iterable[DType] = TABLE) -> str:
    """'fp32|float32, bf16|bfloat16, ...': what a message lists as accepted."""
    return ", ".join(f"{d.short}|{d.name}" for d in allowed)


def parse(name: str, where: str, allowed: tuple[DType, ...] = TABLE) -> DType:
    """The dtype called `name` (either spelling) among `allowed`, or a UserError naming
    `where` (e.g. 'dtype', or a command's '--dtype')."""
    found = find(name) if isinstance(name, str) else None
    if found is None or found not in allowed:
        raise UserError(f"{where}: expected one of {spellings(allowed)}, got {name!r}")
    return found


def from_numpy(dtype) -> DType:
    """The table row of a numpy dtype (float32, ml_dtypes.bfloat16, float16)."""
    dtype = np.dtype(dtype)
    for d in TABLE:
        if d.numpy == dtype:
            return d
    raise ValueError(f"dtype {dtype} is not one of {spellings()}")


def from_safetensors(code: str, where: str) -> DType:
    """The table row of a safetensors code ("BF16"), or a UserError naming `where` (tensor and
    file): only these float dtypes can be a checkpoint's weights."""
    for d in TABLE:
        if d.safetensors == code:
            return d
    raise UserError(f"{where}: dtype {code} is not supported; expected one of "
                    f"{', '.join(d.safetensors for d in TABLE)}")
