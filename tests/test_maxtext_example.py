"""configs/examples/llama3.1-8b-v6e-256.yaml (docs/maxtext.md) is MaxText's llama3_1_8b_8192 run
exactly as the step-model calibration builds it (benchmarks/calibrate_step_model.py): the file a
MaxText user would write from scratch equals the case the model is checked against."""

from __future__ import annotations

import dataclasses

from calibration_script import calibration_module
from k2jax.config import load_config, resolve_device_batch
from train_utils import REPO

EXAMPLE = REPO / "configs" / "examples" / "llama3.1-8b-v6e-256.yaml"
# Settings that change the compiled step (the rest, e.g. the lr schedule, do not).
COMPILED = {"model": None, "mesh": None,
            "data": ("seq_len", "global_batch_size", "micro_batch_size"),
            "train": ("xla_flags", "gradient_dtype")}
NOT_COMPILED_MODEL = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
                      "scaled_output_init", "rms_norm_eps")
REMAT = ("remat", "remat_save", "remat_offload")
# MaxText's policy for the run: custom, these offloaded to host, the rest recomputed.
PUBLISHED_OFFLOAD = ["decoder_layer_input", "query_proj", "key_proj", "value_proj",
                     "attention_out"]


def _calibration_case_config():
    module = calibration_module()
    case = next(c for c in module.CASES if c.name == "llama3.1-8b-v6e-256")
    return module.case_config(case, case.model["layers"]), case


def test_the_example_is_the_calibration_case():
    example = resolve_device_batch(load_config(EXAMPLE, per_device_batch=True), 256)
    reference, case = _calibration_case_config()
    assert example.data.global_batch_size == 4 * 256 == reference.data.global_batch_size
    assert example.model.max_position_embeddings == 8192  # follows data.seq_len
    for section, keys in COMPILED.items():
        mine, theirs = (dataclasses.asdict(getattr(c, section)) for c in (example, reference))
        for key in keys or mine:
            if section == "model" and (key in NOT_COMPILED_MODEL or key in REMAT):
                continue
            assert mine[key] == theirs[key], f"{section}.{key}: {mine[key]} != {theirs[key]}"
    # The remat as published; the calibration case names the same policy by its preset
    # (offload_input_qkv_out = custom offloading exactly these tensors).
    assert (example.model.remat, example.model.remat_offload) == ("custom", PUBLISHED_OFFLOAD)
    assert example.model.remat_save == []
    if reference.model.remat == "custom":
        assert [getattr(reference.model, k) for k in REMAT] == [
            getattr(example.model, k) for k in REMAT]
    else:
        from k2jax.model.transformer import _MAXTEXT_OFFLOADED

        assert reference.model.remat == "offload_input_qkv_out"
        assert list(_MAXTEXT_OFFLOADED) == PUBLISHED_OFFLOAD
    # The start-up flag the case sets in LIBTPU_INIT_ARGS is the one the example's comment names.
    assert case.libtpu_init_args in EXAMPLE.read_text()


def test_docs_link_the_example():
    doc = (REPO / "docs" / "maxtext.md").read_text()
    assert "configs/examples/llama3.1-8b-v6e-256.yaml" in doc
    assert "docs/maxtext.md" in (REPO / "README.md").read_text()
