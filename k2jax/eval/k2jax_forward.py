"""The k2jax side of compare-hf: logits and, optionally, per-layer hidden states.

Hidden states come from flax's `capture_intermediates` on the unscanned layout (`layers_{i}`),
so the model itself is unchanged: we record what each DecoderLayer and the final norm return.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from k2jax.config import ModelConfig
from k2jax.model import K2Model


def _captured(module, method_name: str) -> bool:
    name = module.name or ""
    return method_name == "__call__" and (name.startswith("layers_") or name == "final_norm")


def k2jax_forward(params: dict, config: ModelConfig, tokens_BxS: np.ndarray,
                  hidden_states: bool = False, documents: Optional[dict] = None
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """logits float32 [B, S, V]; with hidden_states (needs config.scan_layers False), the same
    stages as transformers reports: embeddings, layers 0..L-2, final norm output. documents:
    the batch's `segment_ids` / `positions` (packed documents), as training runs them."""
    model = K2Model(config)
    tokens = jnp.asarray(tokens_BxS, jnp.int32)
    documents = {k: jnp.asarray(v, jnp.int32) for k, v in (documents or {}).items()}
    inputs = (tokens, documents.get("positions"), documents.get("segment_ids"))
    if not hidden_states:
        return np.asarray(model.apply({"params": params}, *inputs)), []
    if config.scan_layers:
        raise ValueError("per-layer hidden states need config.scan_layers=False")
    logits, state = model.apply({"params": params}, *inputs, capture_intermediates=_captured,
                                mutable=["intermediates"])
    inter = state["intermediates"]
    embeddings = np.asarray(params["embed_tokens"])[tokens_BxS]
    # A DecoderLayer returns (x, None); flax stores each call's return value in a tuple.
    layers = [np.asarray(inter[f"layers_{i}"]["__call__"][0][0])
              for i in range(config.num_layers - 1)]
    final = np.asarray(inter["final_norm"]["__call__"][0])
    return np.asarray(logits), [embeddings] + layers + [final]
