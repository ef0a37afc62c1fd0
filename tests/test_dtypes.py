"""The one dtype-name table (k2jax/dtypes.py): both spellings wherever a name is parsed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from k2jax import dtypes
from k2jax.config import ModelConfig, load_config
from k2jax.errors import ConfigError, UserError


@pytest.mark.parametrize("name,short,code,numpy", [
    ("float32", "fp32", "F32", np.float32), ("bfloat16", "bf16", "BF16", ml_dtypes.bfloat16),
    ("float16", "fp16", "F16", np.float16)])
def test_every_spelling_names_the_same_row(name, short, code, numpy):
    row = dtypes.parse(name, "--dtype")
    assert dtypes.parse(short, "--dtype") is row
    assert (row.name, row.short, row.safetensors, row.numpy) == (name, short, code,
                                                                  np.dtype(numpy))
    assert dtypes.from_numpy(numpy) is row and dtypes.from_safetensors(code, "t") is row
    assert np.dtype(row.name) == row.numpy  # the name is numpy's (and jnp's, and zarr's) own


def test_unknown_or_disallowed_names_say_where_and_what():
    with pytest.raises(UserError, match=r"^--dtype: expected one of fp32\|float32, "
                                        r"bf16\|bfloat16, fp16\|float16, got 'fp8'$"):
        dtypes.parse("fp8", "--dtype")
    with pytest.raises(UserError, match=r"^--dtype: expected one of fp32\|float32, "
                                        r"bf16\|bfloat16, got 'fp16'$"):
        dtypes.parse("fp16", "--dtype", (dtypes.FLOAT32, dtypes.BFLOAT16))
    with pytest.raises(UserError, match="^tensor w in f: dtype I64 is not supported"):
        dtypes.from_safetensors("I64", "tensor w in f")


def test_config_takes_either_spelling_and_keeps_the_full_name():
    config = load_config(None, ["model.param_dtype=bf16", "model.compute_dtype=fp32",
                                "model.num_layers=2"])
    assert (config.model.param_dtype, config.model.compute_dtype) == ("bfloat16", "float32")
    with pytest.raises(ConfigError, match="model.compute_dtype.*fp32\\|float32.*'int8'"):
        ModelConfig(compute_dtype="int8").validate()


def test_eval_dtype_takes_either_spelling_but_not_fp16():
    from k2jax.weights import inference_model_config

    for name in ("bf16", "bfloat16"):
        assert inference_model_config(ModelConfig(), name).param_dtype == "bfloat16"
    with pytest.raises(UserError, match="inference dtype: .*got 'fp16'"):
        inference_model_config(ModelConfig(), "fp16")
    with pytest.raises(UserError, match="model.rope_freq_dtype: .*got 'int8'"):
        inference_model_config(ModelConfig(), "fp32", rope_freq_dtype="int8")
    with pytest.raises(UserError, match="model.logits_dtype: .*got 'fp16'"):
        inference_model_config(ModelConfig(), "fp32", logits_dtype="fp16")
    assert inference_model_config(ModelConfig(logits_dtype="bfloat16"), "fp32"
                                  ).logits_dtype == "bfloat16"  # None keeps the stored one
