"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus).

The settings are traced scalars, not static arguments, so changing them never recompiles the
decode step; greedy is temperature 0 and is exact argmax (first index on ties, as torch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from k2jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: all tokens
    top_p: float = 1.0        # 1: all tokens
    seed: int = 0
    # Ids >= vocab_limit are never chosen (0: no limit): a model whose embedding is padded past
    # its tokenizer (K2's vocabulary: docs/k2.md) must not emit ids nothing can decode.
    vocab_limit: int = 0

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_limit < 0:
            raise UserError(f"vocab_limit must be >= 0 (0: no limit), got {self.vocab_limit}")
        return self

    def as_arrays(self) -> dict:
        return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
                "top_p": jnp.float32(self.top_p), "vocab_limit": jnp.int32(self.vocab_limit)}


def filter_logits(logits_BxV: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray
                  ) -> jnp.ndarray:
    """Logits outside the top-k and outside the smallest set whose probability reaches top_p
    set to -inf (the most likely token always stays)."""
    vocab = logits_BxV.shape[-1]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_Bx1 = jax.lax.dynamic_slice_in_dim(sorted_BxV, k - 1, 1, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly above each token
    kept_BxV = before_BxV < top_p
    nucleus_min_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    threshold_Bx1 = jnp.maximum(kth_Bx1, nucleus_min_Bx1)
    return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def next_tokens(logits_BxV: jnp.ndarray, key: jax.Array, temperature: jnp.ndarray,
                top_k: jnp.ndarray, top_p: jnp.ndarray,
                vocab_limit: jnp.ndarray = jnp.int32(0)) -> jnp.ndarray:
    """int32 [B]: argmax at temperature 0, else a sample of softmax(filtered logits / T); ids
    >= vocab_limit (when > 0) are masked first."""
    ids_V = jnp.arange(logits_BxV.shape[-1])
    allowed_V = (vocab_limit <= 0) | (ids_V < vocab_limit)
    logits_BxV = jnp.where(allowed_V, logits_BxV, -jnp.inf)

    def greedy(logits_BxV):
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sample(logits_BxV):
        # The vocabulary sort of top-k/top-p only when one of them filters anything.
        filtered = jax.lax.cond((top_k > 0) | (top_p < 1), filter_logits,
                                lambda x, *_: x, logits_BxV, top_k, top_p)
        scaled = filtered / jnp.maximum(temperature, 1e-6)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    # A conditional, not both paths and a select: the sampler's sort and Gumbel noise over the
    # vocabulary took ~12 ms of a ~42 ms greedy decode step on a CPU (docs/performance.md).
    return jax.lax.cond(temperature > 0, sample, greedy, logits_BxV)
