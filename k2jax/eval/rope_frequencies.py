"""The RoPE inverse frequencies of a transformers reference model: as released or as K2 trained.

K2 was trained with bf16-rounded frequencies (Megatron's `inv_freq` buffer went through
`Float16Module`'s `.bfloat16()`), while transformers runs the released checkpoints with fp32
ones (`model.rope_freq_dtype`, docs/reproduce.md). A check against K2's logged loss wants the
first, a check against transformers the second, so each command defaults to its own purpose.
"""

from __future__ import annotations


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
