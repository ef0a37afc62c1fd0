"""Parameter counts from the config, without allocating anything."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.model.transformer import K2Model


def abstract_params(config: ModelConfig, seq_len: int = 8):
    """ShapeDtypeStruct pytree of the (boxed, logically partitioned) parameters."""
    model = K2Model(config)
    tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]


def count_params(config: ModelConfig) -> int:
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
    return sum(math.prod(leaf.shape) for leaf in leaves)
