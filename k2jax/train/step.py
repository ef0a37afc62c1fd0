"""The jitted train step: micro-batch gradient accumulation (a scan, fp32), clipping, AdamW.

Gradients of the *summed*, per-row weighted masked loss are accumulated over micro-batches and
divided once: with `train.loss_normalization: global` (weights 1, divided by the global mask
count) that is sum(loss * mask) / sum(mask) over the whole global batch; with `per_group`
(K2's) the mean of each `loss_group_rows`-row group's masked mean (train/loss_weights.py).
Either way it does not depend on the micro-batch split or the mesh. Weight gradients come out
of the matmuls in `train.gradient_dtype` (model/weight_grad.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from k2jax.config import Config
from k2jax.data.loader import DOCUMENT_KEYS, batch_dtypes
from k2jax.model import K2Model, masked_next_token_loss
from k2jax.model.weight_grad import weight_gradient_dtype
from k2jax.sharding.rules import batch_sharding, rules_list
from k2jax.train.loss_weights import counted_tokens_per_row, loss_row_weights
from k2jax.train.micro_batches import over_micro_batches
from k2jax.train.state import TrainState


def make_loss_and_gradients(config: Config, mesh: Mesh):
    """Returns fn(params, tokens, loss_mask, documents=None) -> (loss, grads fp32 like params,
    counted tokens), to be traced inside a jit: the step's loss and its gradients over the
    whole device batch.

    tokens int32 [P, S], loss_mask float32 [P, S]: the step's global batch in order, then
    zero-mask padding rows (P >= data.global_batch_size), sharded over the batch axes.
    documents: {"segment_ids", "positions"} int32 [P, S] each, either optional (packed
    documents: attention within a document, positions restarting per document).
    """
    model = K2Model(config.model)
    rules = config.mesh.rules

    def summed_loss(params, tokens, loss_mask, documents):
        logits = model.apply({"params": params}, tokens, documents.get("positions"),
                             documents.get("segment_ids"))
        return masked_next_token_loss(logits, tokens, loss_mask)

    def loss_and_gradients(params, tokens, loss_mask, documents=None):
        documents = documents or {}
        document_keys = [key for key in DOCUMENT_KEYS if key in documents]
        row_weights, divisor = loss_row_weights(
            loss_mask, config.data.global_batch_size, config.train.loss_normalization,
            config.train.loss_group_rows)
        count = jnp.sum(counted_tokens_per_row(loss_mask))

        def micro_step(micro_tokens, micro_mask, *micro_documents):
            (loss_sum, _), grads = jax.value_and_grad(summed_loss, has_aux=True)(
                params, micro_tokens, micro_mask, dict(zip(document_keys, micro_documents)))
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss_sum

        # The abstract mesh is what flax's logical constraints and the attention dispatch look
        # for while tracing (`with mesh:` alone left the constraints silently dropped).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                nn.logical_axis_rules(rules_list(rules)), \
                weight_gradient_dtype(config.train.gradient_dtype):
            grads, loss_sum = over_micro_batches(
                micro_step, (tokens, loss_mask * row_weights[:, None],
                             *(documents[key] for key in document_keys)),
                config.data.accumulation_steps, mesh, rules)
        grads = jax.tree.map(lambda g: g / divisor, grads)
        return loss_sum / divisor, grads, count

    return loss_and_gradients


def make_train_step(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh,
                    shardings: TrainState):
    """Returns step(state, batch, loss_ceiling) -> (state, metrics), jitted and donating state.

    batch: tokens int32 [B, S], loss_mask float32 [B, S] and the document fields of
    `batch_dtypes(config)` (sharded over the batch axes).
    loss_ceiling: float32 scalar; the update is applied only if the loss is finite and at most
    this (spike handling passes +inf to always apply).
    """
    loss_and_gradients = make_loss_and_gradients(config, mesh)

    def step(state: TrainState, batch, loss_ceiling):
        loss, grads, count = loss_and_gradients(
            state.params, batch["tokens"], batch["loss_mask"],
            {k: batch[k] for k in DOCUMENT_KEYS if k in batch})
        grad_norm = optax.tree.norm(grads)

        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # The update itself is checked too: a finite loss and gradient can still give a
        # non-finite update (an overflowing learning rate or second moment).
        update_norm = optax.tree.norm(updates)
        apply = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
                 & (loss <= loss_ceiling))
        new_state = jax.lax.cond(
            apply,
            lambda: TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state),
            lambda: TrainState(step=state.step + 1, params=state.params,
                               opt_state=state.opt_state))
        param_norm = optax.tree.norm(new_state.params)
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "update_norm": update_norm,
            "update_ratio": update_norm / jnp.maximum(param_norm, 1e-12),
            "applied": apply,
        }
        return new_state, metrics

    batch_sh = batch_sharding(mesh, config.mesh.rules)
    return jax.jit(step, in_shardings=(shardings, {k: batch_sh for k in batch_dtypes(config.data)},
                                       None),
                   out_shardings=(shardings, None), donate_argnums=0)
