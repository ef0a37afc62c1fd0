"""The jitted train step: micro-batch gradient accumulation (a scan, fp32), clipping, AdamW.

The loss and its normalisation are train/step_loss.py's (shared with eval-loss): gradients of
the summed, per-row weighted masked loss are accumulated over micro-batches and divided once,
so they do not depend on the micro-batch split or the mesh. Weight gradients come out of the
matmuls in `train.gradient_dtype` (model/weight_grad.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from k2jax.config import Config
from k2jax.data.loader import batch_dtypes
from k2jax.sharding.rules import batch_sharding
from k2jax.train.state import TrainState
from k2jax.train.step_loss import training_step_loss


def make_loss_and_gradients(config: Config, mesh: Mesh):
    """Returns fn(params, batch) -> (loss, grads fp32 like params, counted tokens), to be traced
    inside a jit: the step's loss (train/step_loss.py, the definition eval-loss shares) and its
    gradients over the whole device batch (tokens, loss_mask and the document fields of
    `batch_dtypes(config.data)`, [P, S] each, P >= data.global_batch_size)."""
    return training_step_loss(config, mesh).value_and_grad


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
        loss, grads, count = loss_and_gradients(state.params, batch)
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
