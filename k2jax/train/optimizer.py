"""AdamW as K2 trained it: global-norm clipping with Megatron's coefficient, decoupled weight
decay that skips 1-D parameters (norm scales), K2's schedule. The state is a plain optax
pytree, sharded like the parameters."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from k2jax.config import OptimizerConfig
from k2jax.train.schedule import learning_rate


MEGATRON_CLIP_EPSILON = 1e-6


def clip_by_global_norm_megatron(max_norm: float) -> optax.GradientTransformation:
    """Megatron's clipping (LLM360/k2-train megatron/optimizer/clip_grads.py,
    `clip_grad_norm_fp32`): coefficient max_norm / (total_norm + 1e-6), applied when below 1.
    optax.clip_by_global_norm scales by max_norm / total_norm, without the epsilon, so a
    gradient whose norm is just above max_norm is scaled slightly differently (and one whose
    norm lies in (max_norm - 1e-6, max_norm] is scaled here, not there)."""

    def update(updates, state, params=None):
        del params
        coefficient = max_norm / (optax.tree.norm(updates) + MEGATRON_CLIP_EPSILON)
        scale = jnp.minimum(coefficient, 1.0)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig, scanned_layers: bool,
                   schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
    """`scanned_layers`: per-layer norm scales are stacked to 2-D [layers, hidden] and must
    still count as 1-D for weight decay. `schedule`: the learning rate (None: the config's,
    k2jax.train.schedule); the training setup passes the one it also exposes for logging."""

    def mask(params):
        def is_matrix(path, p):
            stacked = scanned_layers and any(getattr(k, "key", None) == "layers" for k in path)
            return p.ndim - (1 if stacked else 0) > 1
        return jax.tree_util.tree_map_with_path(is_matrix, params)

    return optax.chain(
        clip_by_global_norm_megatron(config.grad_clip_norm),
        optax.adamw(schedule or learning_rate(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=mask),
    )
