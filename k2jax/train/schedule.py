"""K2's learning-rate schedule (K2_SPEC section 3), as an optax schedule of the step.

  step <= warmup : lr = peak * step / warmup
  warmup < step <= decay : lr = min + 0.5 * (1 + cos(pi * (step - warmup) / (decay - warmup)))
                                 * (peak - min)
  step > decay   : lr = min
"""

from __future__ import annotations

import jax.numpy as jnp

from k2jax.config import OptimizerConfig


def k2_learning_rate(config: OptimizerConfig):
    peak, low = config.peak_lr, config.min_lr
    warmup, decay = config.warmup_steps, config.decay_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / (decay - warmup), 0.0, 1.0)
        cosine = low + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (peak - low)
        return jnp.where(step <= warmup, warm, cosine)

    return schedule
