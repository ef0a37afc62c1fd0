"""Dtype names: safetensors codes ("BF16"), numpy dtypes, CLI names ("bf16"), HF torch_dtype."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from k2jax.errors import UserError
from k2jax.optional import require

# safetensors dtype code -> numpy dtype; only the float dtypes a checkpoint may hold.
SAFETENSORS_TO_NUMPY = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}
NUMPY_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_NUMPY.items()}

CLI_TO_NUMPY = {"fp32": SAFETENSORS_TO_NUMPY["F32"], "bf16": SAFETENSORS_TO_NUMPY["BF16"],
                "fp16": SAFETENSORS_TO_NUMPY["F16"]}

# numpy dtype -> the name k2jax configs use (param_dtype) and HF config.json uses (torch_dtype).
NUMPY_TO_NAME = {SAFETENSORS_TO_NUMPY["F32"]: "float32", SAFETENSORS_TO_NUMPY["BF16"]: "bfloat16",
                 SAFETENSORS_TO_NUMPY["F16"]: "float16"}


def numpy_dtype(code: str, where: str) -> np.dtype:
    """The numpy dtype of a safetensors code, or a UserError naming `where` (tensor and file)."""
    if code not in SAFETENSORS_TO_NUMPY:
        raise UserError(f"{where}: dtype {code} is not supported; expected one of "
                        f"{', '.join(SAFETENSORS_TO_NUMPY)}")
    return SAFETENSORS_TO_NUMPY[code]


def torch_to_code(torch_dtype) -> str:
    """'torch.bfloat16' -> 'BF16' (others, e.g. 'torch.int64' -> 'I64'-like names, rejected later)."""
    torch = require("torch", "reading PyTorch .bin shards")  # safetensors do not

    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(
        torch_dtype, str(torch_dtype).replace("torch.", ""))


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20, '1000' -> 1000 (Hugging Face's convention)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for suffix, factor in units.items():
        if upper.endswith(suffix):
            number = upper[: -len(suffix)].strip()
            break
    else:
        number, factor = upper, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise UserError(f"--shard-size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    if size <= 0:
        raise UserError(f"--shard-size: must be positive, got {text!r}")
    return size
