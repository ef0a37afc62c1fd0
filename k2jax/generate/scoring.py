"""Log-likelihood of continuations (lm-eval's `loglikelihood` requests): one full forward of the
model per batch, right-padded to a bucketed length, reduced on the device to one log-probability
and one "is greedy" flag per request (no [B, S, vocab] array crosses to the host)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.generate.batching import (batch_shards, bucket, fine_bucket, mesh_context,
                                     pad_right, padded_rows, put_rows, replicate)
from k2jax.model import K2Model

MIN_SCORE_BUCKET = 16


class Scorer:
    """score(pairs) for fixed, already placed `params`; pairs of (context ids, continuation
    ids). As lm-eval's hf backend: the model reads (context + continuation)[-(C + 1):][:-1] for
    context length C, so a long context is cut from the left."""

    def __init__(self, params: Any, config: ModelConfig, mesh: Optional[Mesh] = None,
                 rules: Optional[dict] = None, max_length: Optional[int] = None,
                 min_bucket: int = MIN_SCORE_BUCKET, fine_buckets: Optional[bool] = None):
        """fine_buckets: lengths padded to 4 sizes per octave, not powers of two (None: on a
        CPU; TPU kernels want whole 128-token blocks, and the GPU's are untimed)."""
        self.params, self.config, self.mesh, self.rules = params, config, mesh, rules
        self.max_length = max_length or config.max_position_embeddings
        self.min_bucket = min_bucket
        if fine_buckets is None:
            fine_buckets = jax.default_backend() == "cpu"
        self.bucket = fine_bucket if fine_buckets else bucket
        self._score = jax.jit(self._score_fn)

    def compiles(self) -> int:
        return self._score._cache_size()

    def _score_fn(self, params, tokens_BxS, targets_BxS, mask_BxS):
        """-> (sum of log p(target) over the mask, float32 [B]; every masked target is the
        argmax, bool [B])."""
        with mesh_context(self.mesh, self.rules):
            logits = K2Model(self.config).apply({"params": params}, tokens_BxS)
        logp_BxS = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                                       targets_BxS[..., None], axis=-1)[..., 0]
        greedy_BxS = jnp.argmax(logits, axis=-1) == targets_BxS
        return (replicate(jnp.sum(jnp.where(mask_BxS, logp_BxS, 0.0), axis=1), self.mesh),
                replicate(jnp.all(greedy_BxS | ~mask_BxS, axis=1), self.mesh))

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
              ) -> list[tuple[float, bool]]:
        windows, lengths = [], []
        for i, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise UserError(f"request {i}: context and continuation need a token each")
            if len(continuation) > self.max_length:
                raise UserError(f"request {i}: continuation of {len(continuation)} tokens "
                                f"exceeds the context of {self.max_length}")
            full = (list(context) + list(continuation))[-(self.max_length + 1):]
            windows.append(full)
            lengths.append(len(continuation))
        rows = padded_rows(len(pairs), batch_shards(self.mesh, self.rules))
        length = self.bucket(max(len(w) for w in windows) - 1, self.min_bucket)
        tokens = pad_right([w[:-1] for w in windows], length, rows, 0)
        targets = pad_right([w[1:] for w in windows], length, rows, 0)
        mask = np.zeros((rows, length), bool)
        for i, (window, count) in enumerate(zip(windows, lengths)):
            mask[i, len(window) - 1 - count:len(window) - 1] = True
        put = lambda a: put_rows(a, self.mesh, self.rules)
        logp, greedy = self._score(self.params, put(tokens), put(targets), put(mask))
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        return [(float(logp[i]), bool(greedy[i])) for i in range(len(pairs))]
