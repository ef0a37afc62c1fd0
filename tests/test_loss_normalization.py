"""`train.loss_normalization`: K2's per-group mean of masked means vs. the global masked mean,
whatever k2jax's micro-batch size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.errors import ConfigError
from k2jax.model import K2Model
from k2jax.model.loss import next_token_labels, token_losses
from k2jax.sharding.mesh import build_mesh
from k2jax.train.loss_weights import loss_row_weights
from k2jax.train.setup import build_training_setup
from k2jax.train.step import make_loss_and_gradients
from train_utils import small_config

GROUP = 2  # rows per group; the batch of 8 rows has 4 groups


def _batch(equal_counts: bool):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 128, (8, 16)).astype(np.int32)
    if equal_counts:  # every group counts the same number of tokens
        mask = np.tile((rng.random((2, 16)) > 0.3).astype(np.float32), (4, 1))
    else:  # group 0 counts 2 tokens, the others many more
        mask = (rng.random((8, 16)) > 0.3).astype(np.float32)
        mask[0, :] = 0.0
        mask[1, :] = 0.0
        mask[1, 3:5] = 1.0
    return jnp.asarray(tokens), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)  # pure: the tests share its compiles (issue 16 point 8)
def _reference(normalization, micro, equal_counts):
    """Plain jax, whole batch at once: the loss as Megatron defines it and its gradients, for
    the params of `_step_loss_and_grads("per_group", micro, equal_counts)`."""
    config, params, *_ = _step_loss_and_grads("per_group", micro, equal_counts)
    tokens, mask = _batch(equal_counts)
    model = K2Model(config.model)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens).astype(jnp.float32)
        losses = token_losses(logits, next_token_labels(tokens))
        m = mask.at[:, -1].set(0.0)
        if normalization == "global":
            return jnp.sum(losses * m) / jnp.sum(m)
        group_sums = jnp.sum((losses * m).reshape(-1, GROUP * 16), axis=1)
        group_counts = jnp.sum(m.reshape(-1, GROUP * 16), axis=1)
        return jnp.mean(group_sums / group_counts)

    return jax.jit(jax.value_and_grad(loss_fn))(params)  # jit: eager op-by-op is 10x slower


@functools.lru_cache(maxsize=None)  # pure: the tests share its compiles (issue 16 point 8)
def _step_loss_and_grads(normalization, micro, equal_counts):
    tokens, mask = _batch(equal_counts)
    config = small_config("unused", f"data.micro_batch_size={micro}", "model.compute_dtype=float32",
                          f"train.loss_normalization={normalization}",
                          f"train.loss_group_rows={GROUP}")
    setup = build_training_setup(config)
    params = setup.init_state().params
    loss, grads, count = jax.jit(make_loss_and_gradients(config, setup.mesh))(
        params, {"tokens": tokens, "loss_mask": mask})
    return config, params, float(loss), grads, float(count)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


@pytest.mark.slow  # two train-step compiles and the references: ~35 s idle
@pytest.mark.parametrize("micro", [8, 2])
def test_per_group_loss_and_gradients_equal_the_reference(micro):
    tokens, mask = _batch(equal_counts=False)
    config, params, loss, grads, count = _step_loss_and_grads("per_group", micro, False)
    ref_loss, ref_grads = _reference("per_group", micro, False)
    assert loss == pytest.approx(float(ref_loss), rel=1e-6)
    _close(grads, ref_grads)
    assert count == float(jnp.sum(mask[:, :-1]))
    global_loss, global_grads = _reference("global", micro, False)
    assert abs(loss - float(global_loss)) > 1e-3  # unequal counts: the two really differ
    _, _, loss_g, grads_g, _ = _step_loss_and_grads("global", micro, False)
    assert loss_g == pytest.approx(float(global_loss), rel=1e-6)
    _close(grads_g, global_grads)


@pytest.mark.slow  # two train-step compiles: ~18 s idle
def test_equal_group_counts_make_both_normalisations_agree():
    _, _, loss_p, grads_p, _ = _step_loss_and_grads("per_group", 4, True)
    _, _, loss_g, grads_g, _ = _step_loss_and_grads("global", 4, True)
    assert loss_p == pytest.approx(loss_g, rel=1e-6)
    _close(grads_p, grads_g)


def test_padding_rows_get_weight_zero_and_empty_groups_are_left_out():
    mask = np.ones((10, 5), np.float32)
    mask[2:4] = 0.0  # group 1 (rows 2, 3) counts nothing
    weights, divisor = loss_row_weights(jnp.asarray(mask), 8, "per_group", 2)
    np.testing.assert_allclose(np.asarray(weights),
                               [1 / 8, 1 / 8, 0, 0, 1 / 8, 1 / 8, 1 / 8, 1 / 8, 0, 0])
    assert float(divisor) == 3.0
    weights, divisor = loss_row_weights(jnp.asarray(mask), 8, "global", 2)
    assert float(divisor) == 8 * 4 and np.all(np.asarray(weights) == 1.0)


def test_group_rows_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match="train.loss_group_rows"):
        small_config("unused", "train.loss_normalization=per_group", "train.loss_group_rows=3")
    small_config("unused", "train.loss_normalization=global", "train.loss_group_rows=3")


@pytest.mark.slow  # a train-step compile, the references and two evaluators: ~36 s idle
@pytest.mark.parametrize("micro", [8, 4])
def test_eval_loss_follows_the_normalisation(micro):
    from k2jax.config import MeshConfig
    from k2jax.eval.loss_evaluator import LossEvaluator
    from k2jax.sharding.padding import eval_plan
    from k2jax.train.step_loss import StepLoss

    tokens, mask = _batch(equal_counts=False)
    config, params, step_loss, _, count = _step_loss_and_grads("per_group", 8, False)
    mesh = build_mesh(MeshConfig())
    plan = eval_plan(8, micro, 1)
    batch = {"tokens": np.asarray(tokens), "loss_mask": np.asarray(mask)}  # 8 rows: no padding

    def evaluator(normalization):
        return LossEvaluator(params, StepLoss(config.model, mesh, MeshConfig().rules, plan.rows,
                                              plan.accumulation, normalization, GROUP),
                             config.data)

    for normalization in ("per_group", "global"):
        result = evaluator(normalization)(batch)
        reference, _ = _reference(normalization, 8, False)
        assert result["loss"] == pytest.approx(float(reference), rel=1e-6), normalization
        assert result["tokens"] == count
    assert step_loss == pytest.approx(evaluator("per_group")(batch)["loss"], rel=1e-6)


def test_a_batch_that_is_not_whole_groups_ends_with_a_partial_group():
    """Evaluation takes any batch size: 6 rows in groups of 4 are a group of 4 and one of 2
    (training refuses it in the config), each its own masked mean."""
    mask = np.ones((8, 5), np.float32)
    mask[4, :] = 0.0  # row 4 (in the partial group) counts nothing; its partner row 5 does
    weights, divisor = loss_row_weights(jnp.asarray(mask), 6, "per_group", 4)
    np.testing.assert_allclose(np.asarray(weights), [1 / 16] * 4 + [1 / 4, 1 / 4, 0, 0])
    assert float(divisor) == 2.0
    weights, divisor = loss_row_weights(jnp.asarray(mask[:2]), 2, "per_group", 4)
    np.testing.assert_allclose(np.asarray(weights), [1 / 8, 1 / 8])  # one group of 2 rows
    assert float(divisor) == 1.0
