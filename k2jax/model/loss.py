"""K2's training loss (docs/k2.md): labels are the row shifted left by one; a loss mask
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


@jax.custom_vjp
def token_losses(logits_BxSxV: jnp.ndarray, labels_BxS: jnp.ndarray) -> jnp.ndarray:
    """-log softmax(logits)[label] per position, fp32 logits."""
    return _token_losses_fwd(logits_BxSxV, labels_BxS)[0]


def _is_label(logits_BxSxV, labels_BxS):
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits_BxSxV.shape, 2)
    return vocab_ids == labels_BxS[..., None]


def _token_losses_fwd(logits_BxSxV, labels_BxS):
    log_norm_BxS = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    # A fused compare-and-sum, not a gather: a gather's gradient is a scatter into [B, S, V].
    label_logit_BxS = jnp.sum(jnp.where(_is_label(logits_BxSxV, labels_BxS), logits_BxSxV, 0.0),
                              -1)
    return log_norm_BxS - label_logit_BxS, (logits_BxSxV, labels_BxS, log_norm_BxS)


def _token_losses_bwd(residuals, grad_BxS):
    # The textbook gradient, softmax - one_hot, in one elementwise pass. Autodiff of the forward
    # builds it from two reductions' transposes, which XLA:CPU fused into the lm_head's
    # gradient matmul and ran about 5% of a step slower (docs/performance.md).
    logits_BxSxV, labels_BxS, log_norm_BxS = residuals
    probs = jnp.exp(logits_BxSxV - log_norm_BxS[..., None])
    grad = (probs - _is_label(logits_BxSxV, labels_BxS)) * grad_BxS[..., None]
    return grad, None


token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def masked_next_token_loss(logits_BxSxV: jnp.ndarray, tokens_BxS: jnp.ndarray,
                           loss_mask_BxS: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns (sum of masked token losses, sum of mask), both fp32 scalars."""
    losses_BxS = token_losses(logits_BxSxV.astype(jnp.float32), next_token_labels(tokens_BxS))
    mask = loss_mask_BxS.astype(jnp.float32)
    mask = mask.at[:, -1].set(0.0)
    return jnp.sum(losses_BxS * mask), jnp.sum(mask)
