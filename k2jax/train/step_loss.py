"""The loss of one step's global batch: the one definition the train step and eval-loss share.

A step's device batch (StepLoader: tokens, loss_mask and, for packed documents, segment_ids /
positions, [P, S] each, the global batch's rows in order then zero-mask padding) goes through
the model one micro-batch at a time (train/micro_batches.py). Each micro-step returns the
*summed*, per-row weighted masked loss; the sums are divided once by the normalisation's
divisor (train/loss_weights.py: `global` = sum(loss * mask) / sum(mask) over the batch,
`per_group` = K2's mean of each group's masked mean), so the loss does not depend on the
micro-batch split or the mesh. Packed documents attend within their own document and restart
positions at its first token, in training and evaluation alike. The logits are rounded to
model.logits_dtype before the fp32 loss (model/transformer.py); where one device's logits of a
micro-batch would be large, they are made and dropped a chunk of the sequence at a time
(model.loss_chunk_tokens, model/chunked_loss.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from k2jax.config import ModelConfig
from k2jax.data.loader import DOCUMENT_KEYS
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.model.chunked_loss import (chunked_next_token_loss, gathers_head,
                                      resolve_chunk_tokens)
from k2jax.model.weight_grad import weight_gradient_dtype
from k2jax.sharding.rules import rules_list
from k2jax.train.loss_weights import counted_tokens_per_row, loss_row_weights
from k2jax.train.micro_batches import over_micro_batches


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """rows: the global batch (data.global_batch_size; the device batch may be padded past
    it); normalization / group_rows: train.loss_normalization / train.loss_group_rows;
    accumulation: micro-steps per batch. Methods are traced inside a jit."""

    model_config: ModelConfig
    mesh: Mesh
    rules: dict
    rows: int
    accumulation: int
    normalization: str = "global"
    group_rows: int = 4
    gradient_dtype: str = "float32"

    def _shards(self, logical: str) -> int:
        """Devices one logical axis is split over (mesh.rules)."""
        axes = self.rules.get(logical)
        axes = [] if axes is None else [axes] if isinstance(axes, str) else axes
        return math.prod(self.mesh.shape[axis] for axis in axes)

    def _chunk_tokens(self, tokens) -> Optional[int]:
        """model.loss_chunk_tokens for this micro-batch's shape and the mesh (None: whole)."""
        cfg = self.model_config
        rows, seq = tokens.shape
        return resolve_chunk_tokens(cfg.loss_chunk_tokens, rows / self._shards("batch"), seq,
                                    cfg.vocab_size / self._shards("vocab"))

    def _summed_loss(self, params, tokens, weighted_mask, documents: dict):
        model = K2Model(self.model_config)
        inputs = (tokens, documents.get("positions"), documents.get("segment_ids"))
        chunk = self._chunk_tokens(tokens)
        if chunk is None:
            logits = model.apply({"params": params}, *inputs)
            return masked_next_token_loss(logits, tokens, weighted_mask)[0]
        hidden, head = model.apply({"params": params}, *inputs, return_hidden=True)
        cfg = self.model_config
        gather = gathers_head(cfg.hidden_size, cfg.vocab_size / self._shards("vocab"))
        return chunked_next_token_loss(hidden, head, tokens, weighted_mask, cfg.logits_dtype,
                                       chunk, self._shards("batch"), gather)

    def _prepare(self, batch: dict):
        """(micro-batch inputs, document keys, divisor, counted tokens) of a device batch."""
        loss_mask = batch["loss_mask"]
        row_weights, divisor = loss_row_weights(loss_mask, self.rows, self.normalization,
                                                self.group_rows)
        keys = tuple(key for key in DOCUMENT_KEYS if key in batch)
        inputs = (batch["tokens"], loss_mask * row_weights[:, None], *(batch[k] for k in keys))
        return inputs, keys, divisor, jnp.sum(counted_tokens_per_row(loss_mask))

    def _over_micro_batches(self, fn, inputs, stack: bool):
        # The abstract mesh is what flax's logical constraints and the attention dispatch look
        # for while tracing (`with mesh:` alone left the constraints silently dropped).
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
                nn.logical_axis_rules(rules_list(self.rules)), \
                weight_gradient_dtype(self.gradient_dtype):
            return over_micro_batches(fn, inputs, self.accumulation, self.mesh, self.rules,
                                      stack=stack)

    def sums(self, params: Any, batch: dict):
        """(weighted loss sums f32 [accumulation], counted tokens f32 [], divisor f32 []):
        the loss is sum(sums) / divisor (eval-loss adds the sums on the host in float64)."""
        inputs, keys, divisor, count = self._prepare(batch)

        def micro_step(tokens, mask, *documents):
            return self._summed_loss(params, tokens, mask, dict(zip(keys, documents)))

        return self._over_micro_batches(micro_step, inputs, stack=True), count, divisor

    def value_and_grad(self, params: Any, batch: dict):
        """(loss f32 [], gradients fp32 like params, counted tokens f32 [])."""
        inputs, keys, divisor, count = self._prepare(batch)

        def micro_step(tokens, mask, *documents):
            loss_sum, grads = jax.value_and_grad(self._summed_loss)(
                params, tokens, mask, dict(zip(keys, documents)))
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss_sum

        grads, loss_sum = self._over_micro_batches(micro_step, inputs, stack=False)
        return loss_sum / divisor, jax.tree.map(lambda g: g / divisor, grads), count


def training_step_loss(config, mesh: Mesh) -> StepLoss:
    """The StepLoss a training Config defines."""
    return StepLoss(config.model, mesh, config.mesh.rules, config.data.global_batch_size,
                    config.data.accumulation_steps, config.train.loss_normalization,
                    config.train.loss_group_rows, config.train.gradient_dtype)
