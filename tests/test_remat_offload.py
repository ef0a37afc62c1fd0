"""model.remat offload_qkv_out (save_qkv_out's tensors) and offload_input_qkv_out (MaxText's
custom recipe: layer input, q/k/v and attention output) kept in pinned host memory between the
forward and the backward pass. Same loss and gradients as full remat (CPU has a pinned_host
memory space too); the step-time model charges the host <-> HBM transfers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.aot.chips import CHIPS
from k2jax.aot.collectives import DeviceLayout
from k2jax.aot.hlo_text import parse_module
from k2jax.aot.step_time import StepTimeModel
from k2jax.config import ModelConfig
from k2jax.model.transformer import K2Model

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=2, num_kv_heads=1, param_dtype="float32", compute_dtype="float32",
                   attention="xla", scan_layers=True)


def _loss_and_grads(remat: str):
    return _loss_and_grads_of(dataclasses.replace(TINY, remat=remat))


def _loss_and_grads_of(config: ModelConfig):
    model = K2Model(config)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 64)
    params = model.init(jax.random.key(1), tokens)["params"]

    def loss(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # two compiles of a scanned model with remat: minutes on a loaded 2-core VM
@pytest.mark.parametrize("policy", ["offload_qkv_out", "offload_input_qkv_out"])
def test_offloaded_remat_has_the_loss_and_gradients_of_full_remat(policy):
    (full_loss, full_grads), (off_loss, off_grads) = (_loss_and_grads(r)
                                                      for r in ("full", policy))
    assert float(off_loss) == pytest.approx(float(full_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(off_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["offload_qkv_out", "offload_input_qkv_out"])
def test_tpu_compile_puts_the_saved_tensors_in_host_memory_and_the_model_charges_them(
        tmp_path, policy):
    """On CPU the policy's host placement is a no-op (its memory is the host's); a TPU AOT
    compile places the saved tensors in host memory (layout memory space S(5))."""
    pytest.importorskip("libtpu")
    from k2jax.aot.compile_report import compile_report
    from k2jax.aot.topology import parse_slice
    from k2jax.config import load_config
    from train_utils import SMALL_MODEL
    from train_utils import TINY as TINY_YAML

    hlo = tmp_path / "step.hlo"
    config = load_config(TINY_YAML, SMALL_MODEL + [
        "mesh.fsdp=4", "data.micro_batch_size=8", "model.attention=xla",
        "model.compute_dtype=bfloat16", f"model.remat={policy}"])
    report = compile_report(config, parse_slice("v5p-8"), measure_flops=False, hlo_out=str(hlo))
    assert "S(5)" in hlo.read_text()
    assert report["host_transfer_seconds"] > 0


# One layer's q projection [1,2,256,256] bf16 offloaded into a host buffer, a 4096^3 matmul,
# then read back: two transfers of 256 KiB on the host DMA stream.
HOST = """
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[4096,4096], param_1: bf16[4096,4096]) -> bf16[4096,4096] {
  %param_0 = bf16[4096,4096]{1,0} parameter(0)
  %param_1 = bf16[4096,4096]{1,0} parameter(1)
  ROOT %dot.1 = bf16[4096,4096]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[4096,4096], q: bf16[1,2,256,256]) -> bf16[1,2,256,256] {
  %x = bf16[4096,4096]{1,0} parameter(0)
  %q = bf16[1,2,256,256]{3,2,1,0} parameter(1)
  %i = s32[] constant(0)
  %buf = bf16[2,2,256,256]{3,2,1,0:T(8,128)(2,1)S(5)} custom-call(), custom_call_target="AllocateBuffer"
  %dus = ((bf16[2,2,256,256]{3,2,1,0:T(8,128)(2,1)S(5)}, bf16[1,2,256,256]{3,2,1,0}, s32[], s32[], s32[], s32[]), bf16[2,2,256,256]{3,2,1,0:T(8,128)(2,1)S(5)}, u32[]{:S(2)}) dynamic-update-slice-start(%buf, %q, %i, %i, %i, %i)
  %f = bf16[4096,4096]{1,0} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %dud = bf16[2,2,256,256]{3,2,1,0:T(8,128)(2,1)S(5)} dynamic-update-slice-done(%dus)
  %dss = ((bf16[2,2,256,256]{3,2,1,0:T(8,128)(2,1)S(5)}, s32[], s32[], s32[], s32[]), bf16[1,2,256,256]{3,2,1,0}, u32[]{:S(2)}) dynamic-slice-start(%dud, %i, %i, %i, %i), dynamic_slice_sizes={1,2,256,256}
  ROOT %dsd = bf16[1,2,256,256]{3,2,1,0} dynamic-slice-done(%dss)
}
"""


def test_step_model_charges_host_transfers_overlapped_until_their_done():
    chip = CHIPS["v5p"]
    step = StepTimeModel(parse_module(HOST), chip, DeviceLayout.grid((2, 2, 1))).step()
    one = 2 * 256 * 256 * 2 / chip.host_bandwidth
    assert step.host_transfer_seconds == pytest.approx(2 * one)
    # the offload hides behind the matmul; the read-back has nothing to hide behind
    assert step.exposed_host_seconds == pytest.approx(one)
    assert step.seconds == pytest.approx(step.compute_seconds + step.memory_seconds + one)
