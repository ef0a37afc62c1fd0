"""Batched generation: one prefill of the left-padded prompts, then decode in chunks of steps.

Shapes are bucketed (rows and prompt length to powers of two, new tokens to a power-of-two
number of chunks), so the prefill and the decode chunk each compile once per bucket, however
many prompts and lengths a run sees (`compiles()` reports it). Between chunks the host checks
stop strings, and stops early once every row has ended (EOS, stop string or the token limit).

Sharding: parameters keep the shardings they were put on (k2jax.weights, the training
rules); the prompts' rows and the cache go over the `batch` mesh axes, the cache's kv heads
over `kv_heads` (`mesh.rules`), through the model's logical constraints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from k2jax.config import ModelConfig
from k2jax.errors import UserError
from k2jax.generate.batching import (batch_shards, bucket, mesh_context, pad_left,
                                     padded_rows, put_rows, replicate)
from k2jax.generate.sampling import SamplingParams, next_tokens
from k2jax.model.kv_cache import KVCache, empty_cache, forward_with_cache, per_layer_params

MIN_PROMPT_BUCKET = 16  # prompt lengths are padded to 16, 32, 64, ... tokens
DECODE_CHUNK = 16       # decode steps per device call between stop-string checks


@dataclasses.dataclass
class Generation:
    """One prompt's continuation: token ids (through the EOS that ended it, if one did) and why
    it stopped: "eos", "stop" (a stop string; the ids run to the end of that chunk) or
    "length"."""

    tokens: list[int]
    finish_reason: str


class Generator:
    """generate(prompts, max_new_tokens, ...) for fixed, already placed `params`."""

    def __init__(self, params: Any, config: ModelConfig, mesh: Optional[Mesh] = None,
                 rules: Optional[dict] = None, pad_id: int = 0,
                 min_prompt_bucket: int = MIN_PROMPT_BUCKET, decode_chunk: int = DECODE_CHUNK,
                 per_layer_weights: Optional[bool] = None):
        """per_layer_weights: decode from the weights split per layer (a copy of the scanned
        ones; None: on a CPU, where it halves a decode step). TPUs keep the scanned layout,
        whose memory the AOT decode reports measure."""
        if per_layer_weights is None:
            per_layer_weights = jax.default_backend() == "cpu"
        if per_layer_weights and params is not None:
            params = jax.jit(per_layer_params, static_argnums=1)(params, config.num_layers)
        self.params, self.config = params, config
        self.mesh, self.rules = mesh, rules
        self.pad_id = pad_id
        self.min_prompt_bucket, self.chunk = min_prompt_bucket, decode_chunk
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("slots",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

    def compiles(self) -> dict[str, int]:
        """How many shapes each jitted function has been compiled for so far."""
        return {"prefill": self._prefill._cache_size(), "decode": self._decode._cache_size()}

    # -- device functions ------------------------------------------------------------------

    def _prefill_fn(self, params, tokens_BxP, valid_BxP, *, slots: int):
        with mesh_context(self.mesh, self.rules):
            positions_BxP = jnp.maximum(jnp.cumsum(valid_BxP, axis=1) - 1, 0)
            cache = empty_cache(self.config, tokens_BxP.shape[0], slots)
            logits, cache = forward_with_cache(params, self.config, tokens_BxP, valid_BxP,
                                               positions_BxP, cache, jnp.int32(0),
                                               last_only=True)
        return logits[:, 0], cache, jnp.sum(valid_BxP, axis=1).astype(jnp.int32)

    def _decode_fn(self, params, cache: KVCache, logits_BxV, positions_B, offset, done_B, key,
                   sampling: dict, eos_ids_E):
        """DECODE_CHUNK steps: choose a token from the logits, feed it, get the next logits.
        -> (state..., tokens int32 [C, B], was_done bool [C, B]); a row already done emits
        pad_id and its emitted tokens are dropped by the host."""
        def step(carry, _):
            cache, logits_BxV, positions_B, offset, done_B, key = carry
            key, subkey = jax.random.split(key)
            token_B = next_tokens(logits_BxV, subkey, **sampling)
            token_B = jnp.where(done_B, self.pad_id, token_B)
            now_done_B = done_B | jnp.isin(token_B, eos_ids_E)
            logits_Bx1xV, cache = forward_with_cache(
                params, self.config, token_B[:, None], jnp.ones_like(done_B)[:, None],
                positions_B[:, None], cache, offset, last_only=True)
            carry = (cache, logits_Bx1xV[:, 0], positions_B + 1, offset + 1, now_done_B, key)
            return carry, (token_B, done_B)

        with mesh_context(self.mesh, self.rules):
            carry, (tokens_CxB, was_done_CxB) = jax.lax.scan(
                step, (cache, logits_BxV, positions_B, offset, done_B, key), None,
                length=self.chunk)
        return carry, replicate(tokens_CxB, self.mesh), replicate(was_done_CxB, self.mesh)

    # -- host loop -------------------------------------------------------------------------

    def check_lengths(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      where: str = "prompt") -> None:
        context = self.config.max_position_embeddings
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"{where} {i}: empty (no tokens)")
            if len(prompt) + max_new_tokens > context:
                raise UserError(f"{where} {i}: {len(prompt)} tokens + {max_new_tokens} new ones "
                                f"exceed the model's context of {context} "
                                "(model.max_position_embeddings)")
        vocab = self.config.vocab_size
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise UserError(f"{where} {i}: token id {bad[0]} is outside the model's "
                                f"vocabulary of {vocab}")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
                 stop: Optional[Callable[[int, list[int]], bool]] = None) -> list[Generation]:
        """Continue each prompt (token ids) by up to `max_new_tokens` tokens.

        `eos_ids` end a row (the EOS is kept in its tokens); `stop(i, tokens)` is asked after
        each chunk for each running row i with its tokens so far (e.g. "does the text contain
        a stop string") and ends the row when true."""
        sampling.validate()
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.check_lengths(prompts, max_new_tokens)
        count = len(prompts)
        rows = padded_rows(count, batch_shards(self.mesh, self.rules))
        length = bucket(max(map(len, prompts)), self.min_prompt_bucket)
        new_slots = bucket(max_new_tokens, self.chunk)
        tokens, valid = pad_left([list(p) for p in prompts], length, rows, self.pad_id)
        logits, cache, positions = self._prefill(self.params, put_rows(tokens, self.mesh,
                                                                       self.rules),
                                                 put_rows(valid, self.mesh, self.rules),
                                                 slots=length + new_slots)
        done = np.arange(rows) >= count  # padding rows are done from the start
        state = (cache, logits, positions, jnp.int32(length), jnp.asarray(done),
                 jax.random.key(sampling.seed))
        outputs: list[list[int]] = [[] for _ in range(count)]
        reasons = ["length"] * count
        eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
        produced = 0
        while produced < max_new_tokens and not done.all():
            state, tokens_CxB, was_done_CxB = self._decode(
                self.params, *state, sampling.as_arrays(), eos)
            tokens_CxB, was_done_CxB = np.asarray(tokens_CxB), np.asarray(was_done_CxB)
            take = min(self.chunk, max_new_tokens - produced)
            produced += take
            for i in range(count):
                if done[i]:
                    continue
                for token, was_done in zip(tokens_CxB[:take, i], was_done_CxB[:take, i]):
                    if was_done:
                        break
                    outputs[i].append(int(token))
                    if int(token) in eos_ids:
                        reasons[i] = "eos"
                        break
                if reasons[i] == "eos" or (stop is not None and stop(i, outputs[i])):
                    reasons[i] = reasons[i] if reasons[i] == "eos" else "stop"
                    done[i] = True
            state = state[:4] + (jnp.asarray(done),) + state[5:]
        return [Generation(o, r) for o, r in zip(outputs, reasons)]
