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
from k2jax.model.param_count import abstract_params
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


def state_layout(config: Config, optimizer: optax.GradientTransformation, mesh: Mesh
                 ) -> tuple[TrainState, TrainState]:
    """(TrainState of NamedShardings, TrainState of ShapeDtypeStructs carrying them): the
    state's layout and the restore/compile target, from one `jax.eval_shape` of the parameters;
    nothing is allocated."""
    boxed = abstract_params(config.model)
    params = nn.meta.unbox(boxed)
    opt_shapes = jax.eval_shape(optimizer.init, params)
    params_sh = param_shardings(boxed, mesh, config.mesh.rules)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sharding: sharding, opt_shapes,
                                   params_sh, transform_non_params=lambda _: replicated(mesh))
    shardings = TrainState(step=replicated(mesh), params=params_sh, opt_state=opt_sh)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    return shardings, abstract


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
