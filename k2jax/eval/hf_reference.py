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


def document_spans(segment_ids_S, positions_S, seq: int):
    """[(start, stop, position ids)] of one row: the runs of equal segment ids (each a document
    transformers runs alone; the whole row without segment ids), with the row's positions
    (restarting per document under data.reset_position_ids) or 0..S-1."""
    import numpy as np

    positions = np.arange(seq) if positions_S is None else np.asarray(positions_S)
    if segment_ids_S is None:
        return [(0, seq, positions)]
    cuts = [0] + [i for i in range(1, seq) if segment_ids_S[i] != segment_ids_S[i - 1]] + [seq]
    return [(a, b, positions[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def hf_forward(model, tokens_BxS: np.ndarray, hidden_states: bool = False,
               segment_ids_BxS=None, positions_BxS=None
               ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """logits float32 [B, S, V] and, if asked, named hidden states float32 [B, S, E].

    Packed documents (segment ids) are run one document at a time and their outputs put back
    in the row: transformers' own view of each document, the one k2jax's segment ids give.
    transformers returns L + 1 hidden states: the embeddings, the outputs of layers 0..L-2,
    and the output of layer L-1 *after* the final norm (it replaces the last raw one).
    """
    import torch

    logits, states = [], []
    seq = tokens_BxS.shape[1]
    with torch.no_grad():
        for b, row in enumerate(tokens_BxS):  # one row at a time: K2's fp32 activations are large
            row_logits, row_states = [], []
            for start, stop, positions in document_spans(
                    None if segment_ids_BxS is None else segment_ids_BxS[b],
                    None if positions_BxS is None else positions_BxS[b], seq):
                out = model(torch.as_tensor(row[None, start:stop], dtype=torch.long),
                            position_ids=torch.as_tensor(positions[None], dtype=torch.long),
                            output_hidden_states=hidden_states)
                row_logits.append(out.logits.float().numpy())
                if hidden_states:
                    row_states.append([h.float().numpy() for h in out.hidden_states])
            logits.append(np.concatenate(row_logits, axis=1))
            if hidden_states:
                states.append([np.concatenate(parts, axis=1) for parts in zip(*row_states)])
    named = []
    if hidden_states:
        count = len(states[0])
        names = (["embeddings"] + [f"layer {i}" for i in range(count - 2)]
                 + [f"final norm (layer {count - 2} + norm)"])
        named = [(names[k], np.concatenate([s[k] for s in states])) for k in range(count)]
    return np.concatenate(logits), named
