"""AdamW as K2 trained it: global-norm clipping, decoupled weight decay that skips 1-D
parameters (norm scales), K2's schedule. The state is a plain optax pytree, sharded like the
parameters."""

from __future__ import annotations

import jax
import optax

from k2jax.config import OptimizerConfig
from k2jax.train.schedule import k2_learning_rate


def make_optimizer(config: OptimizerConfig, scanned_layers: bool) -> optax.GradientTransformation:
    """`scanned_layers`: per-layer norm scales are stacked to 2-D [layers, hidden] and must
    still count as 1-D for weight decay."""

    def mask(params):
        def is_matrix(path, p):
            stacked = scanned_layers and any(getattr(k, "key", None) == "layers" for k in path)
            return p.ndim - (1 if stacked else 0) > 1
        return jax.tree_util.tree_map_with_path(is_matrix, params)

    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(k2_learning_rate(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=mask),
    )
