"""Ahead-of-time TPU compiles of `model.attention: splash` (jax's splash attention), on a CPU
host, with libtpu: at K2's per-chip shapes for v5p, v5e and v6e, GQA with segment ids, per
device under shard_map, and inside the sharded train step where `auto` now picks it. Mosaic
lowers the kernels inside these compiles, so a kernel that compiles here compiles on the chip.

    JAX_PLATFORMS=cpu python -m pytest tests/test_splash_attention_tpu_compile.py --durations=0
"""

from __future__ import annotations

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed: TPU ahead-of-time compiles "
                                     "need it (pip install libtpu)")

from k2jax.kernels import sharded_splash_attention, splash_attention  # noqa: E402
from test_flash_attention_tpu_compile import K2_SHARD, compile_attention  # noqa: E402
from tpu_compile_utils import aot_small_sharded_step, compile_over_data_and_tensor  # noqa: E402

pytestmark = pytest.mark.slow  # each compile 13-70 s on 2 busy cores

TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@pytest.mark.parametrize("seq", [2048, 8192], ids=["k2_2048", "k2chat_8192"])
@pytest.mark.parametrize("generation", list(TOPOLOGIES))
def test_k2_shard_compiles_fwd_and_bwd(generation, seq):
    compiled, seconds = compile_attention(TOPOLOGIES[generation], grad=True,
                                          kernel=splash_attention, **{**K2_SHARD, "seq": seq})
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"splash {generation} seq {seq} fwd+bwd compiled in {seconds:.1f} s, "
          f"temp {temp / 2**20:.1f} MiB")
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernels, not an XLA fallback
    # No [seq, seq] score matrix in HBM: one per head in fp32 alone would be 16 MiB at 2048.
    assert temp < seq * seq * 4 * K2_SHARD["heads"] // 4


@pytest.mark.parametrize("topology, overrides", [
    ("v5p:2x2x1", dict(kv_heads=2, segments=True)),      # GQA + packed documents
    ("v5e:2x2", dict(kv_heads=1, seq=1000)),             # MQA, ragged (padded) sequence
], ids=["gqa_segments", "mqa_ragged"])
def test_variants_compile_fwd_and_bwd(topology, overrides):
    shape = {**K2_SHARD, **{k: v for k, v in overrides.items() if k in K2_SHARD}}
    extra = {k: v for k, v in overrides.items() if k not in K2_SHARD}
    compiled, seconds = compile_attention(topology, grad=True, kernel=splash_attention,
                                          **shape, **extra)
    print(f"splash {topology} {overrides} fwd+bwd compiled in {seconds:.1f} s")
    assert "tpu_custom_call" in compiled.as_text()


def test_sharded_over_data_and_tensor_axes_compiles():
    """A v5p 2x2x1 slice as a (data 2, tensor 2) mesh, K2's per-chip shape on every chip:
    shard_map keeps the kernel per device (no all-gather of q, k, v)."""
    text = compile_over_data_and_tensor(sharded_splash_attention, "splash")
    assert "tpu_custom_call" in text
    assert "all-gather" not in text


def test_auto_compiles_splash_inside_the_sharded_train_step():
    """`k2jax aot` plans `model.attention: auto` as splash: Mosaic lowers it per device under
    shard_map in the full train step (fsdp 2 x tensor 2, head_dim 128, bf16)."""
    report = aot_small_sharded_step("auto")
    assert report["attention"] == "splash" and report["fits"] is True