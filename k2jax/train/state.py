"""The train state and how it is created, directly sharded: no host ever holds the whole model."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from k2jax.config import Config
from k2jax.model import K2Model
from k2jax.sharding.rules import param_shardings, replicated
from k2jax.train.schedule import with_schedule_count


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: steps completed
    params: Any
    opt_state: Any


def init_params_fn(config: Config):
    model = K2Model(config.model)

    def init(key):
        tokens = jnp.zeros((1, 8), jnp.int32)
        return model.init(key, tokens)["params"]  # boxed (LogicallyPartitioned)

    return init


def state_shardings(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(abstract boxed params, TrainState of NamedShardings) without allocating anything."""
    boxed = jax.eval_shape(init_params_fn(config), jax.random.key(0))
    params_sh = param_shardings(boxed, mesh, config.mesh.rules)
    opt_shapes = jax.eval_shape(optimizer.init, nn.meta.unbox(boxed))
    opt_sh = optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_shapes,
                                   params_sh, transform_non_params=lambda _: replicated(mesh))
    return boxed, TrainState(step=replicated(mesh), params=params_sh, opt_state=opt_sh)


def create_train_state(config: Config, optimizer, mesh: Mesh, shardings: TrainState,
                       params=None, start_step: int = 0) -> TrainState:
    """Initialise (or wrap given `params`) inside jit with sharded outputs.

    `start_step` (train.start_step): the global step the state stands at. The step counter and
    the lr schedule's counter start there; Adam's moments are zero and its count 0, so its bias
    correction is that of a fresh optimizer.
    """
    init = init_params_fn(config)

    def make(key, given):
        params = nn.meta.unbox(init(key)) if given is None else given
        opt_state = with_schedule_count(optimizer.init(params), start_step)
        return TrainState(step=jnp.asarray(start_step, jnp.int32), params=params,
                          opt_state=opt_state)

    key = jax.random.key(config.train.seed)
    if params is None:
        return jax.jit(lambda k: make(k, None), out_shardings=shardings)(key)
    return jax.jit(make, out_shardings=shardings, donate_argnums=1)(key, params)


def abstract_state(shardings: TrainState, config: Config, optimizer) -> TrainState:
    """ShapeDtypeStructs with shardings, the restore target of a checkpoint."""
    boxed = jax.eval_shape(init_params_fn(config), jax.random.key(0))
    params = nn.meta.unbox(boxed)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(optimizer.init, params))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)
