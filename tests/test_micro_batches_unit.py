"""train/micro_batches.py on its own: which rows each micro-step takes, and that the summed or
stacked outputs do not depend on the split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.config import MeshConfig
from k2jax.sharding.mesh import build_mesh
from k2jax.train.micro_batches import over_micro_batches

MESH_CONFIG = MeshConfig()


def run(fn, batch, accumulation, stack):
    mesh = build_mesh(MESH_CONFIG)
    return jax.jit(lambda *xs: over_micro_batches(fn, xs, accumulation, mesh, MESH_CONFIG.rules,
                                                  stack=stack))(*batch)


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_micro_step_a_takes_rows_m_times_a_plus_a(accumulation):
    rows = np.arange(8, dtype=np.int32)[:, None] * np.ones((1, 3), np.int32)
    taken = run(lambda x: x[:, 0], (rows,), accumulation, stack=True)
    assert taken.shape == (accumulation, 8 // accumulation)
    for a in range(accumulation):
        np.testing.assert_array_equal(np.asarray(taken[a]), np.arange(a, 8, accumulation))


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_sum_over_micro_batches_is_the_whole_batchs(accumulation):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype(np.float32)
    w = rng.normal(size=(8, 5)).astype(np.float32)

    def fn(xs, ws):  # a pytree output: both leaves are summed
        return {"dot": jnp.sum(xs * ws), "count": jnp.sum(ws > 0).astype(jnp.float32)}

    out = run(fn, (x, w), accumulation, stack=False)
    np.testing.assert_allclose(float(out["dot"]), float(np.sum(x * w)), rtol=1e-5)
    assert float(out["count"]) == float(np.sum(w > 0))
    stacked = run(fn, (x, w), accumulation, stack=True)
    assert stacked["dot"].shape == (accumulation,)
    np.testing.assert_allclose(float(jnp.sum(stacked["dot"])), float(np.sum(x * w)), rtol=1e-5)
