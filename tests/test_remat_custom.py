"""model.remat custom (MaxText's remat_policy custom): each named tensor of a layer kept on
device (model.remat_save), moved to pinned host memory (model.remat_offload) or recomputed.
The layer input is one of them (decoder_layer_input), as MaxText's recipes offload it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from k2jax.config import REMAT_TENSORS, load_config
from k2jax.errors import ConfigError
from train_utils import SMALL_MODEL, TINY

OFFLOAD = ["decoder_layer_input", "query_proj", "key_proj", "value_proj", "attention_out"]


@pytest.mark.parametrize("overrides, line", [
    (["model.remat_offload=[query_proj]"], "config key 'model.remat_offload': only with "
                                           "model.remat custom (got 'none')"),
    (["model.remat=custom", "model.remat_save=[out_proj]"],
     "config key 'model.remat_save': unknown tensor(s) ['out_proj'] (known: "
     + ", ".join(REMAT_TENSORS) + ")"),
    (["model.remat=custom", "model.remat_save=[mlp_out]", "model.remat_offload=[mlp_out]"],
     "config key 'model.remat_offload': ['mlp_out'] also in model.remat_save"),
])
def test_bad_custom_remat_is_one_line(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert str(err.value).startswith(line), str(err.value)


def test_custom_remat_config_loads():
    model = load_config(TINY, ["model.remat=custom", "model.remat_save=[mlp_out]",
                               f"model.remat_offload=[{','.join(OFFLOAD)}]"]).model
    assert (model.remat, model.remat_save, model.remat_offload) == ("custom", ["mlp_out"],
                                                                    OFFLOAD)


@pytest.mark.slow  # two compiles of a scanned model with remat
def test_custom_remat_has_the_loss_and_gradients_of_full_remat():
    from test_remat_offload import TINY as TINY_MODEL, _loss_and_grads_of

    custom = dataclasses.replace(TINY_MODEL, remat="custom", remat_save=["mlp_out"],
                                 remat_offload=OFFLOAD)
    (full_loss, full_grads), (loss, grads) = (
        _loss_and_grads_of(c) for c in (dataclasses.replace(TINY_MODEL, remat="full"), custom))
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_offloading_the_layer_input_moves_it_off_the_device(tmp_path):
    """A TPU AOT compile: with decoder_layer_input offloaded, each layer's saved input is in
    host memory (S(5)) and the device holds less than with it kept (offload_qkv_out)."""
    pytest.importorskip("libtpu")
    from k2jax.aot.compile_report import compile_report
    from k2jax.aot.topology import parse_slice

    base = SMALL_MODEL + ["mesh.fsdp=4", "data.micro_batch_size=8", "model.attention=xla",
                          "model.compute_dtype=bfloat16", "model.num_layers=8",
                          "model.hidden_size=256", "model.num_heads=2", "model.num_kv_heads=2",
                          "model.intermediate_size=512", "data.seq_len=512",
                          "model.max_position_embeddings=512"]
    # The saved layer inputs per chip: 8 layers x 2 rows x 512 tokens x 256 wide in bf16.
    stacked_inputs = 8 * 2 * 512 * 256 * 2  # 4 MiB (measured 2026-12-07: 3.5 MiB less)
    reports = {}
    for name, extra in (("kept", ["model.remat=custom", "model.remat_offload=[query_proj]"]),
                        ("offloaded", ["model.remat=custom",
                                       "model.remat_offload=[decoder_layer_input,query_proj]"])):
        hlo = tmp_path / f"{name}.hlo"
        reports[name] = compile_report(load_config(TINY, base + extra), parse_slice("v5p-8"),
                                       measure_flops=False, hlo_out=str(hlo))
        assert "S(5)" in hlo.read_text()
    kept, offloaded = reports["kept"], reports["offloaded"]
    assert kept["temp_bytes_per_chip"] - offloaded["temp_bytes_per_chip"] > stacked_inputs / 2
    assert offloaded["host_transfer_seconds"] > kept["host_transfer_seconds"] > 0


@pytest.mark.parametrize("name", ["context", "attention_out"])
def test_a_saved_name_is_a_residual_of_the_layer(name):
    """remat_save=[name] keeps that tensor between the passes (jax's print_saved_residuals
    names it), and `full` keeps none of them: context is the attention output before its
    projection."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    from k2jax.model.transformer import K2Model
    from test_remat_offload import TINY as TINY_MODEL

    def saved_names(config):
        model = K2Model(config)
        tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
        params = model.init(jax.random.key(1), tokens)["params"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(lambda p: model.apply({"params": p}, tokens).sum(), params)
        return printed.getvalue()

    unrolled = dataclasses.replace(TINY_MODEL, scan_layers=False)  # scan outputs are unnamed
    kept = saved_names(dataclasses.replace(unrolled, remat="custom", remat_save=[name]))
    assert f"named '{name}'" in kept
    assert "named '" not in saved_names(dataclasses.replace(unrolled, remat="full"))
