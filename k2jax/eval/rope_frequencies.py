"""`--rope-freq-dtype` of eval-loss and compare-hf: which RoPE inverse frequencies a check uses.

K2 was trained with bf16-rounded frequencies (Megatron's `inv_freq` buffer went through
`Float16Module`'s `.bfloat16()`), while transformers runs the released checkpoints with fp32
ones (`model.rope_freq_dtype`, docs/reproduce.md). A check against K2's logged loss wants the
first, a check against transformers the second, so each command defaults to its own purpose.
"""

from __future__ import annotations

import argparse


def add_rope_freq_dtype_arg(p: argparse.ArgumentParser, default: str, why: str) -> None:
    from k2jax import dtypes
    from k2jax.commands.cli_args import dtype_metavar, dtype_type

    allowed = (dtypes.FLOAT32, dtypes.BFLOAT16)
    p.add_argument("--rope-freq-dtype", default=default, metavar=dtype_metavar(allowed),
                   type=dtype_type(allowed, "--rope-freq-dtype", full_name=True),
                   help=f"RoPE inverse frequencies rounded to this dtype ({default}: {why}); "
                        "bfloat16 = K2 as trained, float32 = transformers")


def round_hf_rope_frequencies(model, freq_dtype: str):
    """A transformers model with every `inv_freq` buffer rounded to `freq_dtype` and cast back
    to fp32 (in place; float32 leaves it as it is), the same frequencies k2jax uses."""
    import torch

    if freq_dtype == "float32":
        return model
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.copy_(buffer.to(getattr(torch, freq_dtype)).to(torch.float32))
    return model
