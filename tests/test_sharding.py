"""Sharding rules, meshes and row padding.

The numerical test runs every mesh in ONE subprocess with 8 simulated CPU devices (the flag must
be set before jax is imported; one process pays the start-up once): five fp32 training steps of
the small model on data x fsdp x tensor = 8x1x1, 1x8x1, 2x2x2, 1x4x2 must give the losses of the
single-device run, and every device must hold only its shard of parameters and optimizer state.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from k2jax.config import MeshConfig
from k2jax.errors import UserError
from k2jax.sharding.mesh import build_mesh, resolve_axis_sizes
from train_utils import REPO, small_config, subprocess_env

pytestmark = pytest.mark.slow  # 8-device subprocesses and TPU AOT compiles

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
STEPS = 5


# ---------------------------------------------------------------------------------------------
# The 8-device worker (run as `python tests/test_sharding.py`).


def _run_mesh(sizes, devices, steps):
    import jax

    from k2jax.data.loader import StepLoader
    from k2jax.train.setup import build_training_setup

    data, fsdp, tensor = sizes
    config = small_config("unused", f"mesh.data={data}", f"mesh.fsdp={fsdp}",
                          f"mesh.tensor={tensor}", "model.num_heads=4", "model.num_kv_heads=4",
                          "model.compute_dtype=float32")
    setup = build_training_setup(config, devices)
    mesh, step_fn, batch_sh = setup.mesh, setup.step, setup.batch_sharding
    state = setup.init_state()
    loader = StepLoader.from_config(config, padding=setup.padding, sharding=batch_sh)
    rows = setup.padding.padded_rows
    shards = {"params": _shard_report(state.params), "opt_state": _shard_report(state.opt_state)}

    losses, tokens = [], []
    for step in range(steps):
        batch = loader.device_batch(step)
        if step == 0:
            lowered = step_fn.lower(state, batch, np.float32(np.inf)).as_text()
            constraints = lowered.count("sharding_constraint") + lowered.count("@Sharding")
        old_leaf = jax.tree.leaves(state.params)[0]
        state, metrics = step_fn(state, batch, np.float32(np.inf))
        losses.append(float(metrics["loss"]))
        tokens.append(float(metrics["tokens"]))
    return {"losses": losses, "tokens": tokens, "rows": rows, "shards": shards,
            "donated": bool(old_leaf.is_deleted()), "sharding_constraints": constraints,
            "batch_spec": str(batch_sh.spec), "mesh": dict(mesh.shape)}


def _shard_report(tree):
    """Per leaf: global shape, the shapes of this process's shards, and matrix-ness."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[jax.tree_util.keystr(path)] = {
            "shape": list(leaf.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in leaf.addressable_shards}),
            "expected": list(leaf.sharding.shard_shape(leaf.shape)),
            "devices": len(leaf.addressable_shards)}
    return out


def worker_main() -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    devices = jax.devices()
    assert len(devices) == 8, devices
    results = {"1x1x1": _run_mesh((1, 1, 1), devices[:1], STEPS)}
    for sizes in MESHES:
        results["x".join(map(str, sizes))] = _run_mesh(sizes, devices, STEPS)
    print("RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def mesh_results():
    env = subprocess_env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO, timeout=400,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_sharded_losses_match_single_device(mesh_results, mesh):
    reference = mesh_results["1x1x1"]["losses"]
    got = mesh_results[mesh]["losses"]
    assert len(got) == STEPS
    np.testing.assert_allclose(got, reference, rtol=1e-5)
    # Only real rows count: padding rows carry no loss mask.
    assert mesh_results[mesh]["tokens"] == mesh_results["1x1x1"]["tokens"]


@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_each_device_holds_only_its_shard(mesh_results, mesh):
    data, fsdp, tensor = map(int, mesh.split("x"))
    result = mesh_results[mesh]
    for tree in ("params", "opt_state"):
        matrices = 0
        for name, leaf in result["shards"][tree].items():
            assert leaf["devices"] == 8, name
            assert leaf["shard_shapes"] == [leaf["expected"]], name  # every shard as planned
            if "norm" not in name and len(leaf["shape"]) >= 2:  # weights and Adam moments
                matrices += 1
                split = math.prod(leaf["shape"]) // math.prod(leaf["expected"])
                assert split == fsdp * tensor, (name, leaf)
        assert matrices > 0
    assert result["donated"], "the step must donate (and so free) the previous state"
    assert result["sharding_constraints"] > 0, "activations carry sharding constraints"
    assert "fsdp" in result["batch_spec"] and "data" in result["batch_spec"]


def test_padding_rows_when_batch_does_not_divide(mesh_results):
    # micro-batch 4 rows over 8 data-parallel devices: padded to 8 per micro-batch, 2 micro-steps.
    assert mesh_results["1x1x1"]["rows"] == 8
    assert mesh_results["8x1x1"]["rows"] == 16
    assert mesh_results["1x8x1"]["rows"] == 16
    assert mesh_results["2x2x2"]["rows"] == 8


# ---------------------------------------------------------------------------------------------
# Cheap in-process checks (one CPU device).


def test_padding_is_exact_in_the_loss():
    import jax.numpy as jnp

    from k2jax.config import DataConfig
    from k2jax.data.loader import StepLoader
    from k2jax.data.synthetic import SyntheticSource
    from k2jax.model.loss import masked_next_token_loss
    from k2jax.sharding.padding import PaddingPlan

    rng = np.random.default_rng(0)
    loader = StepLoader(SyntheticSource(50, 10, 0),
                        DataConfig(seq_len=10, global_batch_size=6, micro_batch_size=6),
                        padding=PaddingPlan(rows=6, micro_rows=8, accumulation=1))
    real, padded = loader.global_batch(0), loader.host_batch(0)
    assert padded["tokens"].shape == (8, 10) and not padded["loss_mask"][6:].any()
    assert not padded["tokens"][6:].any()
    np.testing.assert_array_equal(padded["tokens"][:6], real["tokens"])
    logits = rng.standard_normal((6, 10, 50)).astype(np.float32)
    plogits = np.concatenate([logits, rng.standard_normal((2, 10, 50)).astype(np.float32)])
    s1, c1 = masked_next_token_loss(jnp.asarray(logits), jnp.asarray(real["tokens"]),
                                    jnp.asarray(real["loss_mask"]))
    s2, c2 = masked_next_token_loss(jnp.asarray(plogits), jnp.asarray(padded["tokens"]),
                                    jnp.asarray(padded["loss_mask"]))
    assert float(c1) == float(c2) == 6 * 9
    assert float(s1) == pytest.approx(float(s2), rel=1e-6)  # 8 rows vs 6: another summation


def test_k2_batch_padding_on_pods():
    from types import SimpleNamespace

    from k2jax.sharding.padding import data_parallel_size, training_plan

    rules = MeshConfig().rules
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 256, "tensor": 1})
    plan = training_plan(2040, 1020, data_parallel_size(mesh, rules))
    assert (plan.micro_rows, plan.accumulation, plan.padded_rows) == (1024, 2, 2 * 1024)
    mesh = SimpleNamespace(shape={"data": 1, "fsdp": 128, "tensor": 4})
    # 2040 / 64 hosts is uneven: padded to 1024 per micro-batch, 32 rows per host.
    assert training_plan(2040, 1020, data_parallel_size(mesh, rules), 64).padded_rows == 2048
    mesh = SimpleNamespace(shape={"data": 2, "fsdp": 256, "tensor": 1})
    assert training_plan(2040, 2040, data_parallel_size(mesh, rules)).padding_rows == 8


def test_eval_padding_plan():
    from k2jax.sharding.padding import eval_plan

    # K2's 2040 rows, 4 rows per device on 256 devices: one micro-step of 1024 padded to 2 x 1024.
    plan = eval_plan(2040, None, 256)
    assert (plan.micro_rows, plan.accumulation, plan.padding_rows) == (1024, 2, 8)
    assert eval_plan(4, None, 8).micro_rows == 8  # the batch, rounded up to the devices
    assert (eval_plan(4, 3, 1).padded_rows, eval_plan(4, 3, 1).accumulation) == (6, 2)
    assert eval_plan(6, None, 2, process_count=4).micro_rows % 4 == 0  # equal host slices
    for micro, processes in ((6, 1), (8, 3)):
        with pytest.raises(UserError, match="^micro_batch "):
            eval_plan(8, micro, 4, processes)


def test_mesh_axis_sizes_and_errors():
    assert resolve_axis_sizes(MeshConfig(fsdp=-1), 8) == (1, 8, 1)
    assert resolve_axis_sizes(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert resolve_axis_sizes(MeshConfig(fsdp=-1, dcn_data=2), 8) == (1, 4, 1)
    with pytest.raises(UserError, match="does not match the 8 devices"):
        resolve_axis_sizes(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(UserError, match="not divisible"):
        resolve_axis_sizes(MeshConfig(data=3, fsdp=-1), 8)
    with pytest.raises(UserError, match="slices"):
        resolve_axis_sizes(MeshConfig(dcn_data=3), 8)


def _tpu_devices(topology, **kwargs):
    pytest.importorskip("libtpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                             **kwargs).devices)


def test_mesh_follows_tpu_topology_and_dcn_hybrid():
    from jax.experimental import mesh_utils

    devices = _tpu_devices("v5p:2x2x2")
    mesh = build_mesh(MeshConfig(data=1, fsdp=4, tensor=2), devices)
    expected = mesh_utils.create_device_mesh((1, 4, 2), devices=devices,
                                             allow_split_physical_axes=True)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.flat]
    assert mesh.axis_names == ("data", "fsdp", "tensor")

    two_slices = _tpu_devices("v5e:2x2", num_slices=2)
    mesh = build_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=2), two_slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for row, slice_index in zip(mesh.devices.reshape(2, -1), (0, 1)):
        # DCN on the outer axis: each data-parallel replica lives in one slice.
        assert {d.slice_index for d in row} == {slice_index}


if __name__ == "__main__":
    worker_main()


def test_eval_loss_binds_activation_constraints():
    """The eval step traces under the abstract mesh, so the model's logical activation
    constraints reach the lowered program (under `with mesh:` alone only the two explicit
    micro-batch constraints did)."""
    import jax
    import jax.numpy as jnp

    from k2jax.eval.loss_evaluator import jitted_sums
    from k2jax.train.step_loss import StepLoss
    from k2jax.weights.on_mesh import sharded_abstract_params

    config = small_config("unused-run-dir")
    mesh = build_mesh(config.mesh)
    params, shardings = sharded_abstract_params(config.model, mesh, config.mesh.rules)
    loss_fn = jitted_sums(StepLoss(config.model, mesh, config.mesh.rules, 4, 1), shardings,
                          ("tokens", "loss_mask"))
    rows = jax.ShapeDtypeStruct((4, 16), jnp.int32)
    text = loss_fn.lower(params, {"tokens": rows,
                                  "loss_mask": rows.update(dtype=jnp.float32)}).as_text()
    assert text.count("sharding_constraint") + text.count("@Sharding") > 2
