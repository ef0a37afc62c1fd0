"""A LLaMA-shaped config written from scratch for `k2jax aot` (docs/maxtext.md, "What a config
must say"): what it needs, what the rest defaults to, and bad keys or values as one line, exit 2,
before libtpu is touched."""

from __future__ import annotations

import pytest
import yaml

from k2jax.config import load_config, resolve_device_batch

SCRATCH = {
    "model": {"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
              "num_layers": 80, "num_heads": 64, "num_kv_heads": 8, "rope_theta": 500000.0},
    "data": {"seq_len": 8192, "per_device_batch_size": 2},
    "train": {"gradient_dtype": "bfloat16"},
}


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_what_a_scratch_config_gets_by_default(tmp_path):
    config = resolve_device_batch(load_config(write(tmp_path, SCRATCH), per_device_batch=True),
                                  256)
    m, d = config.model, config.data
    assert (m.resolved_head_dim, m.max_position_embeddings) == (128, 8192)  # follows seq_len
    assert (m.tie_word_embeddings, m.mlp_activation, m.scan_layers) == (False, "swiglu", True)
    assert (m.param_dtype, m.compute_dtype, m.remat, m.attention) == (
        "float32", "bfloat16", "full", "auto")
    assert (d.source, d.global_batch_size, d.micro_batch_size) == ("synthetic", 512, 512)
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 1)
    assert config.train.xla_flags is None


def test_a_named_context_is_kept_and_checked(tmp_path):
    data = {**SCRATCH, "model": {**SCRATCH["model"], "max_position_embeddings": 4096}}
    with pytest.raises(Exception, match=r"^config key 'data.seq_len': 8192 exceeds "
                                        r"model.max_position_embeddings=4096$"):
        load_config(write(tmp_path, data), per_device_batch=True)


@pytest.mark.parametrize("change, line", [
    ({"model": {"num_kv_head": 8}}, "config key 'model.num_kv_head': unknown key (known: "),
    ({"model": {"num_kv_heads": 3}}, "config key 'model.num_kv_heads': 3 does not divide "
                                     "model.num_heads=64"),
    ({"model": {"remat": "qkv_proj_offloaded"}}, "config key 'model.remat': expected one of "),
    ({"data": {"per_device_batch_size": "4x"}}, "config key 'data.per_device_batch_size': "
                                                "expected int or float or null, got '4x'"),
    ({"train": {"xla_flags": "xla_tpu_foo=1"}}, "config key 'train.xla_flags': expected flags "
                                                "like --xla_name=value"),
])
def test_bad_keys_and_values_are_one_line_exit_2(tmp_path, capsys, change, line):
    from k2jax.cli import main

    data = {section: {**SCRATCH.get(section, {}), **change.get(section, {})}
            for section in {*SCRATCH, *change}}
    assert main(["aot", "--config", str(write(tmp_path, data)), "--topology", "v6e-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"k2jax aot: error: {line}"), err


def test_a_kernel_out_of_scoped_vmem_is_one_line_naming_the_flag():
    """libtpu's error when splash's fused backward at 2048 blocks and 4 rows per chip outgrows
    the default 32 MiB of scoped VMEM (seen 2026-12-07 on v6e-8), shortened."""
    from k2jax.aot.compile_failures import vmem_oom_line

    message = ("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of memory in "
               "memory space vmem while allocating on stack for %splash_mha_dkv_no_residuals.2 = "
               "(f32[4,2048,128]{2,1,0:T(8,128)}) custom-call(...). Scoped allocation with size "
               "33.84M and limit 32.00M exceeded scoped vmem limit by 1.84M.")
    line = vmem_oom_line(message)
    assert line == ("train.xla_flags: the TPU compile ran out of scoped VMEM in "
                    "splash_mha_dkv_no_residuals.2 (33.84MB needed, limit 32.00MB): raise the "
                    "limit with --xla_tpu_scoped_vmem_limit_kib=N in train.xla_flags (MaxText's "
                    "v6e recipes set 98304), or use smaller model.attention_block_* / "
                    "attention_backward_blocks")
    assert vmem_oom_line("RESOURCE_EXHAUSTED: Ran out of memory on HBM") is None
