"""K2's learning-rate schedule (docs/k2.md), as an optax schedule of the step.

  step < warmup  : lr = peak * step / warmup
  warmup <= step <= decay : lr = min + 0.5 * (1 + cos(pi * (step - warmup) / (decay - warmup)))
                                 * (peak - min)
  step > decay   : lr = min

Both branches give `peak` at step == warmup, so the split only matters for warmup 0, where
Megatron runs step 0 at peak (its warm-up branch is taken only when warmup > 0). `step` is the
0-based index of the update (the optax schedule count): the lr of step t is the one update t
uses.

`optimizer.schedule` picks it (k2, the default) or a schedule of its own for a run that
continues another (K2's stage 2, a fine-tune), with a warm-up of `warmup_steps` that starts at
`schedule_start_step` (s0) instead of 0:

  constant     : lr = peak * (step - s0) / warmup during the warm-up, then peak
  linear_decay : the same warm-up, then peak falling linearly to min at decay_steps, then min
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from k2jax.config import OptimizerConfig


def k2_learning_rate(config: OptimizerConfig):
    peak, low = config.peak_lr, config.min_lr
    warmup, decay = config.warmup_steps, config.decay_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / (decay - warmup), 0.0, 1.0)
        cosine = low + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (peak - low)
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def warmed_up_learning_rate(config: OptimizerConfig):
    """The `constant` and `linear_decay` schedules (module docstring); 0 before s0."""
    peak, low, warmup = config.peak_lr, config.min_lr, config.warmup_steps
    start, decay = config.schedule_start_step, config.decay_steps
    decay_from = start + warmup

    def schedule(step):
        since = jnp.asarray(step, jnp.float32) - start
        warm = peak * jnp.clip(since / max(warmup, 1), 0.0, 1.0)
        if config.schedule == "constant":
            return jnp.where(since < warmup, warm, peak)
        progress = jnp.clip((since - warmup) / (decay - decay_from), 0.0, 1.0)
        return jnp.where(since < warmup, warm, peak + progress * (low - peak))

    return schedule


def learning_rate(config: OptimizerConfig):
    """The optax schedule `optimizer.schedule` names: step (int) -> lr (float32)."""
    if config.schedule == "k2":
        return k2_learning_rate(config)
    return warmed_up_learning_rate(config)


# The optimizer state holds two counters: Adam's (bias correction of its moments) and the
# schedule's (which lr the next update uses). They are equal in a run from step 0; a run that
# continues K2 from released weights (train.start_step) starts the schedule at the global step
# and Adam at 0, because the released checkpoints carry no moments.


def _schedule_states(opt_state) -> list:
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(x)]
    if len(found) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer, found "
                         f"{len(found)}")
    return found


def schedule_count(opt_state) -> jax.Array:
    """The schedule's counter: int32 scalar, the 0-based index whose lr the next update uses."""
    return _schedule_states(opt_state)[0].count


def with_schedule_count(opt_state, count):
    """`opt_state` with the schedule's counter set to `count` (Adam's own count untouched)."""
    _schedule_states(opt_state)  # exactly one, or a clear error
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(
        lambda x: optax.ScaleByScheduleState(count=jnp.asarray(count, x.count.dtype))
        if is_schedule(x) else x, opt_state, is_leaf=is_schedule)
