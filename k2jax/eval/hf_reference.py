"""The reference side of compare-hf: transformers' LlamaForCausalLM in PyTorch, CPU, fp32,
eager attention (no fused kernels, so it is the plain textbook computation)."""

from __future__ import annotations

import numpy as np

from k2jax.errors import UserError
from k2jax.optional import require
from k2jax.storage import remote


def load_hf_model(directory: str):
    torch = require("torch", "compare-hf (the transformers reference)")
    LlamaForCausalLM = require("transformers", "compare-hf (the transformers reference)"
                               ).LlamaForCausalLM

    local = remote.local_copy(directory)  # transformers reads local files only
    try:
        model = LlamaForCausalLM.from_pretrained(local, dtype=torch.float32,
                                                 attn_implementation="eager")
    except (OSError, ValueError) as err:
        raise UserError(f"{directory}: transformers cannot load it ({err})")
    return model.eval()


def hf_forward(model, tokens_BxS: np.ndarray, hidden_states: bool = False
               ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """logits float32 [B, S, V] and, if asked, named hidden states float32 [B, S, E].

    transformers returns L + 1 hidden states: the embeddings, the outputs of layers 0..L-2,
    and the output of layer L-1 *after* the final norm (it replaces the last raw one).
    """
    import torch

    logits, states = [], []
    with torch.no_grad():
        for row in tokens_BxS:  # one row at a time: K2's fp32 activations are large
            out = model(torch.as_tensor(row[None], dtype=torch.long),
                        output_hidden_states=hidden_states)
            logits.append(out.logits.float().numpy())
            if hidden_states:
                states.append([h.float().numpy() for h in out.hidden_states])
    named = []
    if hidden_states:
        count = len(states[0])
        names = (["embeddings"] + [f"layer {i}" for i in range(count - 2)]
                 + [f"final norm (layer {count - 2} + norm)"])
        named = [(names[k], np.concatenate([s[k] for s in states])) for k in range(count)]
    return np.concatenate(logits), named
