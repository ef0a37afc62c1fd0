"""K2's training loss (K2_SPEC section 3): labels are the row shifted left by one; a loss mask
[B, S] weights the prediction made at each position (the last position always has weight 0).
Loss = sum(token loss * mask) / sum(mask) over the whole global batch, in fp32.

The function returns the (sum, count) pair so gradient accumulation over micro-batches can add
them up and divide once, exactly as Megatron's global-batch mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_labels(tokens_BxS: jnp.ndarray) -> jnp.ndarray:
    """labels[:, i] = tokens[:, i + 1]; the last label is a dummy 0 (always masked)."""
    return jnp.concatenate([tokens_BxS[:, 1:], jnp.zeros_like(tokens_BxS[:, :1])], axis=1)


def masked_next_token_loss(logits_BxSxV: jnp.ndarray, tokens_BxS: jnp.ndarray,
                           loss_mask_BxS: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns (sum of masked token losses, sum of mask), both fp32 scalars."""
    logits = logits_BxSxV.astype(jnp.float32)
    labels_BxS = next_token_labels(tokens_BxS)
    log_norm_BxS = jax.nn.logsumexp(logits, axis=-1)
    # A fused compare-and-sum, not a gather: its gradient is elementwise, where a gather's is
    # a scatter into [B, S, V] (slow on CPU, and no faster on TPU).
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    label_logit_BxS = jnp.sum(jnp.where(vocab_ids == labels_BxS[..., None], logits, 0.0), -1)
    mask = loss_mask_BxS.astype(jnp.float32)
    mask = mask.at[:, -1].set(0.0)
    return jnp.sum((log_norm_BxS - label_logit_BxS) * mask), jnp.sum(mask)
