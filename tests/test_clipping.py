"""Megatron's gradient clipping (K2): coefficient max_norm / (total_norm + 1e-6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from k2jax.train.optimizer import make_optimizer
from train_utils import small_config


def _adam_first_moment(grads, max_norm):
    """mu after one update = (1 - beta1) * clipped gradient."""
    config = small_config("unused").optimizer
    optimizer = make_optimizer(dataclasses.replace(config, grad_clip_norm=max_norm),
                               scanned_layers=False)
    params = jax.tree.map(jnp.zeros_like, grads)
    _, state = optimizer.update(grads, optimizer.init(params), params)
    mus = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu"))
           if hasattr(s, "mu")]
    assert len(mus) == 1
    return jax.tree.map(lambda m: m / (1 - config.beta1), mus[0])


def test_clip_coefficient_has_megatrons_epsilon():
    # Norm 1.1e-3 against max_norm 1e-3: the 1e-6 in the denominator changes the clipped
    # gradient by about 1e-6 / 1.1e-3 = 9e-4 relative (optax's clip_by_global_norm has none).
    rng = np.random.default_rng(0)
    g = rng.standard_normal(64).astype(np.float32)
    g *= np.float32(1.1e-3 / np.linalg.norm(g.astype(np.float64)))
    grads = {"w": jnp.asarray(g.reshape(8, 8)), "b": jnp.asarray(g[:8] * 0)}
    norm = np.sqrt(np.sum(g.astype(np.float64) ** 2))
    clipped = _adam_first_moment(grads, 1e-3)
    megatron = g.reshape(8, 8) * (1e-3 / (norm + 1e-6))
    np.testing.assert_allclose(np.asarray(clipped["w"]), megatron, rtol=2e-6)
    optax_clipped, _ = optax.clip_by_global_norm(1e-3).update(grads, optax.EmptyState())
    relative = np.abs(np.asarray(clipped["w"]) / np.asarray(optax_clipped["w"]) - 1)
    assert np.all(relative > 5e-4)


def test_gradients_below_the_norm_are_untouched():
    grads = {"w": jnp.full((4, 4), 0.01, jnp.float32)}  # norm 0.04 < 1
    np.testing.assert_allclose(np.asarray(_adam_first_moment(grads, 1.0)["w"]),
                               np.asarray(grads["w"]), rtol=1e-6)
