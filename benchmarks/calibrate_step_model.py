"""Calibrate the TPU step-time model (k2jax/aot/step_time.py) against published TPU results.

Builds in k2jax the dense LLaMA-style runs MaxText publishes (AI-Hypercomputer/maxtext: the
v5p and v5e READMEs and their configs/*.sh, the Llama 2 70B v5p-512 config; Google's
tpu-recipes v6e runs of Llama 3.1 8B, Mistral 7B and GPT-3 175B; their batch, sequence length,
remat policy and ICI/DCN sharding as published), AOT-compiles each for its TPU topology with libtpu
(no TPU needed), and prints predicted against published MFU, or against the published step
time where a recipe gives one (error = published step / predicted step - 1).

Compile cost: each run is compiled with `--layers` (default 2) scanned layers and its
layer loop is costed at the published layer count (the scan body is one layer, so the
extrapolation is exact per layer: `StepTimeModel(layer_trips=...)`); `--check-extrapolation`
also compiles a small model at both layer counts and compares. A compile in which XLA unrolled
the forward or the backward layer scan (the 2-layer multi-slice ones) is an error row: rerun
it with more `--layers` (cases that need 4 say so in `min_compile_layers`). Each row gives the
compile's wall and CPU seconds and the load average; `--reuse` re-costs kept HLO in seconds.
The default run is the calibration, every published recipe once (13 cases): compiled cold in
20 minutes on 2 cores under TCMalloc (2026-12-07); `--cases all` adds the six runs that repeat
the Llama 3.1 8B recipe at other scales or on Mistral 7B (19 cases: 45 minutes; about 1.8
times as long on a slower 2-vCPU VM). The closing line gives the run's mean, spread and range
of errors. `--stored` re-costs the programs kept in the repository in about 2 s.

Kept programs: a case is compiled only when no program compiled from the same key is kept
(k2jax/aot/program_key.py: the case's lowered step, its flags, libtpu's start-up flags and the
topology, compiled by this jax and libtpu). The script lowers each case (a second or two), and
costs `--hlo-dir`'s program or the repository's (benchmarks/calibration_hlo, keys.json) when
its key matches, else compiles: a run with nothing changed takes under a minute, a change of
k2jax's model code recompiles the cases whose program it changes, a new libtpu all of them.
`--recompile` compiles every case; `--update-stored` keeps what a run compiled in the
repository, with its key.

Exit status: 0 when every chosen case was costed; 1 when a case was not (its row says why,
e.g. no kept HLO under `--reuse`); 2 for bad arguments, an unusable or gs:// `--hlo-dir`, a
damaged keys file or a program that cannot be written (one line).

Each case is the configuration as published, read at the MaxText commit its `source` names
(model dims, activation, tied vocabulary, head_dim, per-device batch, remat, sharding, sequence,
and the LIBTPU_INIT_ARGS of its .sh, passed as `train.xla_flags`). MFU is MaxText's of that
date: 6 x all parameters + causal attention in Dec 2023; full attention in Jan and Jul 2025.

    JAX_PLATFORMS=cpu python benchmarks/calibrate_step_model.py [--cases calibration|all|NAME,...]
    python benchmarks/calibrate_step_model.py --stored --cases all   # every kept program, 2 s
    python benchmarks/calibrate_step_model.py --recompile --hlo-dir DIR   # the cold calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import os
import sys
import time
from typing import Optional

# MaxText's flags (LIBTPU_INIT_ARGS of each published config's .sh).
_ASYNC = ("--xla_enable_async_collective_permute=true --xla_tpu_enable_ag_backward_pipelining=true "
          "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
          "--xla_tpu_data_parallel_opt_different_sized_ops=true "
          "--xla_tpu_enable_async_collective_fusion=true "
          "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
          "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
V5P_FLAGS_2023 = "--xla_tpu_megacore_fusion_allow_ags=false " + _ASYNC  # v5p/*.sh @76bd53b0f
V5E_FLAGS_2023 = ("--xla_tpu_enable_data_parallel_all_reduce_opt=true "  # v5e/*.sh @76bd53b0f
                  "--xla_tpu_data_parallel_opt_different_sized_ops=true "
                  "--xla_tpu_enable_async_collective_fusion=true "
                  "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                  "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                  "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true")
LLAMA2_FLAGS = "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true " + V5P_FLAGS_2023
# v5p/32b.sh @9501baa13 adds SparseCore all-gather offload (and turns fusing all-gathers off).
V5P_FLAGS_2025 = (LLAMA2_FLAGS + " --xla_sc_disable_megacore_partitioning=true "
                  "--xla_tpu_use_tc_device_shape_on_sc=true "
                  "--xla_tpu_enable_sparse_core_collective_offload_all_gather=true "
                  "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=false")


def _old_base(scale: int) -> dict:
    """MaxText's global_parameter_scale model on base.yml as of 76bd53b0f (2023-12-15), the
    READMEs' v5p/v5e figures: emb 2560, 8 heads of 256, ReLU MLP of 2 matrices (8192), 16
    layers, vocab 32768 with tied embeddings (logits_via_embedding), each scaled by
    pyconfig.get_individual_scales (heads and mlp, then emb, then layers, in turn)."""
    log2 = scale.bit_length() - 1
    base, rem = divmod(log2, 3)
    heads = mlp = base + int(rem > 0)
    emb, layers = base + int(rem > 1), base
    return dict(hidden=2560 << emb, heads=8 << heads, kv_heads=8 << heads, head_dim=256,
                mlp=8192 << mlp, layers=16 << layers, vocab=32768, activation="relu", tied=True)


# base.yml from 2024-02-14 (3b2ac8113) on: emb 2048, 16 heads of 128, SwiGLU 7168, 16 layers,
# vocab 32000 untied; scale 32 -> 8192 wide, 64 heads, MLP 28672, 32 layers.
NEW_32B = dict(hidden=8192, heads=64, kv_heads=64, head_dim=128, mlp=28672, layers=32,
               vocab=32000, activation="swiglu", tied=False)
LLAMA31_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, layers=32,
                  vocab=128256, activation="swiglu", tied=False)
# benchmarks/xla_flags_library.py @5e6a7caff: DENSE_VMEM_LIMIT_FLAG, LAYOUT_FOR_ALL_REDUCE_SCATTER,
# DATA_PARALLEL_OVERLAP, CF_FOR_ALL_GATHER, ENABLE_SPARSECORE_OFFLOADING_FOR_ALL_REDUCE and
# HOST_OFFLOAD_FLAGS, less "--2a886c8_chip_config_name=megachip_tccontrol" (a chip config,
# not a compiler flag) and --xla_sc_disjoint_spmem=false, which libtpu 0.0.42.1 takes only at
# start-up: the case passes it in LIBTPU_INIT_ARGS (Case.libtpu_init_args).
V6E_LLAMA31_8B_FLAGS = (
    "--xla_tpu_scoped_vmem_limit_kib=98304 --xla_tpu_use_minor_sharding_for_major_trivial_input=true "
    "--xla_tpu_relayout_group_size_threshold_for_reduce_scatter=1 "
    "--xla_tpu_assign_all_reduce_scatter_layout=true "
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
    "--xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_reduce=false "
    "--xla_tpu_enable_sparse_core_collective_offload_all_reduce=true "
    "--xla_tpu_enable_all_reduce_offload_tracing=true --xla_tpu_use_tc_device_shape_on_sc=true "
    "--xla_sc_enable_instruction_fusion=false "
    "--xla_sc_disable_megacore_partitioning=true "
    "--xla_tpu_enable_all_experimental_scheduler_features=true "
    "--xla_tpu_enable_scheduler_memory_pressure_tracking=true "
    "--xla_tpu_host_transfer_overlap_limit=24 --xla_tpu_aggressive_opt_barrier_removal=ENABLED "
    "--xla_lhs_prioritize_async_depth_over_stall=ENABLED "
    "--xla_tpu_enable_ag_backward_pipelining=true "
    "--xla_should_allow_loop_variant_parameter_in_chain=ENABLED "
    "--xla_should_add_loop_invariant_op_in_chain=ENABLED --xla_max_concurrent_host_send_recv=100 "
    "--xla_tpu_scheduler_percent_shared_memory_limit=100 --xla_latency_hiding_scheduler_rerun=2")
# The tpu-recipes v6e runs (MaxText@tpu-recipes-v0.1.4 = 9f1820b47, 2025-07-10, and
# tpu-recipes-v0.1.2 = 14b5876ea, 2025-04-16; benchmarks/xla_flags_library.py the same in both
# for these groups) add DISABLE_COLLECTIVE_MATMUL to the flags above.
V6E_RECIPE_FLAGS = (V6E_LLAMA31_8B_FLAGS
                    + " --xla_jf_spmd_threshold_for_windowed_einsum_mib=1000000")
# MaxText's mistral-7b.yml @14b5876ea: Llama-shaped (no sliding window in its decoder), vocab
# 32000, rope 1e6.
MISTRAL_7B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, layers=32,
                  vocab=32000, activation="swiglu", tied=False)
# Splash as the recipes set it (sa_block_* 2048 everywhere, sa_use_fused_bwd_kernel).
SPLASH_2048_FUSED = ("model.attention_block_q=2048", "model.attention_block_kv=2048",
                     "model.attention_backward_blocks=[2048,2048,2048,2048]",
                     "model.attention_fused_backward=true")
# MaxText's gpt3-175b.yml @14b5876ea: 12288 wide, 96 heads of 128 (MHA), a GELU MLP of 2
# matrices (49152), 96 layers, vocab 50304 through the embedding (logits_via_embedding).
# Its LayerNorms, biases and learned positions are not expressible here (RMSNorm, no bias,
# RoPE): elementwise work of well under 1% of the step at this width.
GPT3_175B = dict(hidden=12288, heads=96, kv_heads=96, head_dim=128, mlp=49152, layers=96,
                 vocab=50304, activation="gelu", tied=True)
# benchmarks/xla_flags_library.py @14b5876ea: DENSE_VMEM_LIMIT_FLAG + CF_FOR_ALL_GATHER +
# DATA_PARALLEL_OVERLAP + DISABLE_BUNDLE_AWARE_COST_MODEL.
V6E_GPT3_FLAGS = (
    "--xla_tpu_scoped_vmem_limit_kib=98304 --xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
    "--xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_use_bundle_aware_cost_model_for_fusions=false")
# sa_block_q 1024, sa_block_q_dkv 2048, sa_block_q_dq 2048, the rest base.yml's 512, no fused
# backward.
SPLASH_GPT3 = ("model.attention_block_q=1024", "model.attention_block_kv=512",
               "model.attention_backward_blocks=[2048,512,2048,512]",
               "model.attention_fused_backward=false")
# MaxText's llama3.1-405b.yml @14b5876ea: 16384 wide, 128 heads of 128 with 8 KV heads, SwiGLU
# 53248, 126 layers, vocab 128256 untied, rope 500000.
LLAMA31_405B = dict(hidden=16384, heads=128, kv_heads=8, head_dim=128, mlp=53248, layers=126,
                    vocab=128256, activation="swiglu", tied=False)
# benchmarks/xla_flags_library.py @14b5876ea and @3eb77db3c: DENSE_VMEM_LIMIT_FLAG +
# CF_FOR_ALL_GATHER + HOST_OFFLOAD_FLAGS (the Llama 3.1 405B recipes on v6e and v5p).
DENSE_CF_HOST_OFFLOAD_FLAGS = (
    "--xla_tpu_scoped_vmem_limit_kib=98304 --xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true "
    "--xla_tpu_enable_all_experimental_scheduler_features=true "
    "--xla_tpu_enable_scheduler_memory_pressure_tracking=true "
    "--xla_tpu_host_transfer_overlap_limit=24 --xla_tpu_aggressive_opt_barrier_removal=ENABLED "
    "--xla_lhs_prioritize_async_depth_over_stall=ENABLED "
    "--xla_tpu_enable_ag_backward_pipelining=true "
    "--xla_should_allow_loop_variant_parameter_in_chain=ENABLED "
    "--xla_should_add_loop_invariant_op_in_chain=ENABLED --xla_max_concurrent_host_send_recv=100 "
    "--xla_tpu_scheduler_percent_shared_memory_limit=100 --xla_latency_hiding_scheduler_rerun=2")
LLAMA2_70B = dict(hidden=8192, heads=64, kv_heads=8, head_dim=128, mlp=28672, layers=80,
                  vocab=32000, activation="swiglu", tied=False)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    topology: str  # Google's slice name
    slices: int
    model: dict
    seq_len: int
    per_chip_batch: int  # MaxText per_device_batch_size (one device per chip on v5p/v5e)
    remat: str  # k2jax's name of MaxText's policy
    tensor: int  # ici_tensor_parallelism (fsdp takes the rest of the slice)
    published_mfu: float
    causal_mfu: bool  # MaxText's MFU of that date counts causal attention (half the FLOPs)
    source: str  # MaxText commit and files the case was read from
    xla_flags: str = ""
    overrides: tuple = ()  # further k2jax settings of the published run
    libtpu_init_args: str = ""  # flags libtpu reads only at start-up (set before it loads)
    # A published step time (tpu-recipes' "completed step: N, seconds: S" line): the error is
    # then published step / predicted step - 1, whatever the MFU convention; published_mfu is
    # derived from it (MaxText's TFLOP/s of that date over the chip's peak).
    published_step_seconds: float = 0.0
    # Layers to compile instead of --layers: with 2, XLA unrolled both layer scans of the v6e
    # offloading recipes (libtpu 0.0.42.1, 2026-12-07: no while loop left) and the multi-slice
    # backward scan, so they compile 4.
    min_compile_layers: int = 0
    # The calibration case whose published recipe this run repeats at another scale or batch
    # (or on a model of the same shape): such runs are compiled only with `--cases all`.
    repeats: str = ""


_V5P_2023 = "maxtext@76bd53b0f (2023-12-15) MaxText/configs/v5p/README.md + {}.sh, base.yml"
_V5E_2023 = "maxtext@76bd53b0f (2023-12-15) MaxText/configs/v5e/README.md + {}.sh, base.yml"
# The calibration (the default run) is every published recipe once: the nine v5p/v5e runs, and
# on v6e Llama 3.1 8B on v6e-256, GPT-3 175B, Llama 3.1 405B on 2 x v6e-256, and 405B on
# v5p-1024. `--cases all` adds six runs that repeat the 8B recipe (`repeats`): 8B on v6e-8 to
# v6e-128 and Mistral 7B on v6e-8 (the same remat, splash and flags; the v6e-8/16/32 and Mistral
# workloads also turn collective matmul off). A v6e compile takes 3-8 minutes on 2 cores, so
# the calibration compiles cold in under 30 minutes and all 19 in 45 (docs/performance.md).
# remat_policy=minimal is jax's checkpoint_dots_with_no_batch_dims = k2jax save_dots_no_batch.
# MaxText's MFU in Dec 2023 (train.py calculate_training_tflops @76bd53b0f): 6 x all
# parameters + causal attention; in Jan 2025 (maxtext_utils.py @9501baa13): full attention.
CASES = [
    Case("32b-v5p-128", "v5p-128", 1, _old_base(32), 2048, 8, "save_dots_no_batch", 4, 0.7147,
         True, _V5P_2023.format("32b"), V5P_FLAGS_2023),
    Case("64b-v5p-128", "v5p-128", 1, _old_base(64), 2048, 4, "save_dots_no_batch", 4, 0.7031,
         True, _V5P_2023.format("64b"), V5P_FLAGS_2023),
    Case("128b-v5p-256", "v5p-256", 1, _old_base(128), 2048, 2, "save_dots_no_batch", 8, 0.6868,
         True, _V5P_2023.format("128b"), V5P_FLAGS_2023),
    Case("32b-v5e-256", "v5e-256", 1, _old_base(32), 2048, 4, "full", 1, 0.6686, True,
         _V5E_2023.format("32b"), V5E_FLAGS_2023),
    Case("64b-v5e-256", "v5e-256", 1, _old_base(64), 2048, 2, "full", 1, 0.5990, True,
         _V5E_2023.format("64b"), V5E_FLAGS_2023),
    # With 2 layers XLA unrolls the multi-slice backward scan: 4 (docs/performance.md).
    Case("32b-2xv5p-128", "v5p-128", 2, _old_base(32), 2048, 8, "save_dots_no_batch", 4, 0.6943,
         True, _V5P_2023.format("32b") + " (2 slices, dcn data)", V5P_FLAGS_2023,
         min_compile_layers=4),
    Case("64b-2xv5e-256", "v5e-256", 2, _old_base(64), 2048, 2, "full", 1, 0.5666, True,
         _V5E_2023.format("64b") + " (2 slices, dcn data)", V5E_FLAGS_2023,
         min_compile_layers=4),
    # The re-measurement on the new base model: README.md and v5p/32b.sh @9501baa13
    # (2025-01-23), per_device_batch_size 6. Its table keeps 328 TFLOP/s/chip (71.5% of 459)
    # beside 67.76%: the MFU column is read.
    Case("32b-v5p-128-2025", "v5p-128", 1, NEW_32B, 2048, 6, "save_dots_no_batch", 4, 0.6776,
         False, "maxtext@9501baa13 (2025-01-23) README.md + MaxText/configs/v5p/32b.sh",
         V5P_FLAGS_2025),
    # save_dot_except_mlpwi saves q/k/v, attention out and mlp out projections = save_qkv_out.
    # "512 chips" in tiering.md; the config says 1 x v5p-512 (256 chips) for a 4M-token batch.
    # v6e (Trillium), a model under 20B: Llama 3.1 8B, llama3_1_8b_8192 in benchmarks/
    # maxtext_trillium_model_configs.py (@5e6a7caff, 2025-09-26, and the same at 9f1820b47):
    # batch 4, seq 8192, fsdp 256, remat custom offloading the layer input and q/k/v/out
    # projections to host (= offload_input_qkv_out), splash 2048 blocks with the fused backward.
    # Published step: tpu-recipes Llama3.1-8B-MaxText/v6e-256/README.md (tpu-recipes-v0.1.4),
    # "completed step: 14, seconds: 4.546" (until 2026-12-07 read from tiering.md's 45.46% MFU
    # as causal, 4.04 s; the recipe's step is that MFU read as full attention).
    Case("llama3.1-8b-v6e-256", "v6e-256", 1, LLAMA31_8B, 8192, 4, "offload_input_qkv_out", 1,
         0.0, False, "maxtext@5e6a7caff (2025-09-26) benchmarks/maxtext_trillium_model_"
         "configs.py llama3_1_8b_8192; tpu-recipes Llama3.1-8B-MaxText/v6e-256/README.md",
         V6E_LLAMA31_8B_FLAGS, SPLASH_2048_FUSED + ("model.rope_theta=500000.0",),
         "--xla_sc_disjoint_spmem=false", 4.546, min_compile_layers=4),
    # Two runs added 2026-12-07 after the efficiencies of k2jax/aot/chips.py, not seen by the
    # model before they were costed: tpu-recipes Llama3.1-8B-MaxText/v6e-64 and v6e-128
    # READMEs (tpu-recipes-v0.1.4 = maxtext@9f1820b47): llama3_1_8b_8192_bs5 (batch 5) on
    # v6e-64, "seconds: 5.652"; llama3_1_8b_8192 (batch 4) on v6e-128, "seconds: 4.602"; the
    # flags and settings of the v6e-256 run. One deviation: k2jax's logits are fp32 (MaxText's
    # bf16), and at batch 5 the whole fp32 logits (19.6 GiB) do not fit a v6e's 31.25 GiB
    # (libtpu: "Used 31.32G of 31.25G hbm"), so that case computes the loss in 4 sequence
    # chunks (the same FLOPs).
    *(Case(f"llama3.1-8b-v6e-{n}", f"v6e-{n}", 1, LLAMA31_8B, 8192, batch, "offload_input_qkv_out",
           1, 0.0, False, f"maxtext@9f1820b47 (2025-07-10) tpu-recipes-v0.1.4 {workload}; "
           f"tpu-recipes Llama3.1-8B-MaxText/v6e-{n}/README.md", V6E_LLAMA31_8B_FLAGS,
           SPLASH_2048_FUSED + ("model.rope_theta=500000.0",) + loss, "--xla_sc_disjoint_spmem=false",
           seconds, 4, repeats="llama3.1-8b-v6e-256")
      for n, batch, workload, seconds, loss in (
          (64, 5, "llama3_1_8b_8192_bs5", 5.652, ("model.loss_chunk_tokens=2048",)),
          (128, 4, "llama3_1_8b_8192", 4.602, ()))),
    # tpu-recipes training/trillium/Llama3.1-8B-MaxText/v6e-{8,16,32}/README.md: workload
    # llama3_1_8b_8192_no_collective_matmul @9f1820b47 (tpu-recipes-v0.1.4): batch 3, seq 8192,
    # fsdp = all chips, remat custom (layer input, q/k/v/out offloaded = offload_input_qkv_out),
    # splash 2048 with the fused backward. Published "seconds: 3.443 / 3.393 / 3.495" (step 14).
    # MaxText's TFLOP/s then (maxtext_utils.py @9f1820b47) counts full attention.
    *(Case(f"llama3.1-8b-v6e-{n}", f"v6e-{n}", 1, LLAMA31_8B, 8192, 3, "offload_input_qkv_out",
           1, 0.0, False, f"maxtext@9f1820b47 (2025-07-10) tpu-recipes-v0.1.4 "
           f"llama3_1_8b_8192_no_collective_matmul; tpu-recipes Llama3.1-8B-MaxText/v6e-{n}",
           V6E_RECIPE_FLAGS, SPLASH_2048_FUSED + ("model.rope_theta=500000.0",),
           "--xla_sc_disjoint_spmem=false", seconds, 4, repeats="llama3.1-8b-v6e-256")
      for n, seconds in ((8, 3.443), (16, 3.393), (32, 3.495))),
    # tpu-recipes training/trillium/Mistral-7B-MaxText/README.md: mistral_7b @14b5876ea
    # (tpu-recipes-v0.1.2), v6e-8, batch 6, seq 8192, the same remat, splash and flags;
    # "completed step: 6, seconds: 6.320".
    Case("mistral-7b-v6e-8", "v6e-8", 1, MISTRAL_7B, 8192, 6, "offload_input_qkv_out", 1, 0.0,
         False, "maxtext@14b5876ea (2025-04-16) tpu-recipes-v0.1.2 mistral_7b; tpu-recipes "
         "Mistral-7B-MaxText/README.md", V6E_RECIPE_FLAGS,
         SPLASH_2048_FUSED + ("model.rope_theta=1000000.0",), "--xla_sc_disjoint_spmem=false",
         6.320, 4, repeats="llama3.1-8b-v6e-256"),
    # tpu-recipes training/trillium/GPT3-175B-MaxText/bf16/README.md: gpt_3_175b_bf16
    # @14b5876ea (tpu-recipes-v0.1.2), v6e-256, batch 3, seq 2048 (base.yml), fsdp 256, remat
    # full (no offload: the kind of K2's v6e plan), splash; "completed step: 15, seconds:
    # 17.182". Added 2026-12-07 after the MXU-side change, as a run the model had not seen.
    Case("gpt3-175b-v6e-256", "v6e-256", 1, GPT3_175B, 2048, 3, "full", 1, 0.0, False,
         "maxtext@14b5876ea (2025-04-16) tpu-recipes-v0.1.2 gpt_3_175b_bf16; tpu-recipes "
         "GPT3-175B-MaxText/bf16/README.md", V6E_GPT3_FLAGS, SPLASH_GPT3,
         published_step_seconds=17.182),
    # tpu-recipes training/trillium/Llama3.1-405B-MaxText/README.md: llama3_1_405b_8192_pure_
    # fsdp_ici @14b5876ea (tpu-recipes-v0.1.2), 2 x v6e-256, batch 1, seq 8192, fsdp 256 in a
    # slice x 2 over DCN, remat custom offloading only the layer input (base.yml: the rest
    # recomputed), splash as GPT-3's; "completed step: 14, seconds: 54.803". Added 2026-12-07
    # as the second run the model had not seen (nothing changed for it).
    Case("llama3.1-405b-2xv6e-256", "v6e-256", 2, LLAMA31_405B, 8192, 1, "custom", 1, 0.0,
         False, "maxtext@14b5876ea (2025-04-16) tpu-recipes-v0.1.2 llama3_1_405b_8192_pure_"
         "fsdp_ici; tpu-recipes Llama3.1-405B-MaxText/README.md",
         DENSE_CF_HOST_OFFLOAD_FLAGS,
         SPLASH_GPT3 + ("model.remat_offload=[decoder_layer_input]", "mesh.dcn_data=1",
                        "mesh.dcn_fsdp=2", "model.rope_theta=500000.0"),
         published_step_seconds=54.803, min_compile_layers=4),
    # tpu-recipes training/v5p/Llama3.1-405B-MaxText/README.md (tpu-recipes@7e88b6d, 2025-10-07):
    # llama3_1_405b_8192_v5p_1024 in benchmarks/maxtext_v5p_model_configs.py @3eb77db3c
    # (2025-10-06), v5p-1024 (512 chips), batch 2, seq 8192, fsdp 512, remat custom (layer input
    # kept, base.yml's default; context and mlpwo offloaded; the rest recomputed), splash 2048
    # blocks everywhere without the fused backward, num_vocab_tiling 4 (= 4 sequence chunks of
    # the loss), the 405B v6e run's flags; "completed step: 10, seconds: 131.474" (MaxText's
    # TFLOP/s there counts causal attention: 314.530 x 131.474 = its FLOPs to 1e-6). Added
    # 2026-12-07 after the efficiencies of chips.py, not seen by the model before it was costed.
    Case("llama3.1-405b-v5p-1024", "v5p-1024", 1, LLAMA31_405B, 8192, 2, "custom", 1, 0.0,
         True, "maxtext@3eb77db3c (2025-10-06) benchmarks/maxtext_v5p_model_configs.py "
         "llama3_1_405b_8192_v5p_1024; tpu-recipes v5p/Llama3.1-405B-MaxText/README.md",
         DENSE_CF_HOST_OFFLOAD_FLAGS,
         ("model.attention_block_q=2048", "model.attention_block_kv=2048",
          "model.attention_backward_blocks=[2048,2048,2048,2048]",
          "model.attention_fused_backward=false", "model.remat_save=[decoder_layer_input]",
          "model.remat_offload=[context,mlp_out]", "model.loss_chunk_tokens=2048",
          "model.rope_theta=500000.0"),
         published_step_seconds=131.474, min_compile_layers=4),
    Case("llama2-70b-v5p-512", "v5p-512", 1, LLAMA2_70B, 4096, 4, "save_qkv_out", 1, 0.654,
         True, "maxtext@e1fde4579 (2025-09-03) docs/reference/models/tiering.md, "
               "MaxText/configs/v5p/llama2_70b.sh", LLAMA2_FLAGS),
]


def maxtext_flops_per_step(case: Case) -> float:
    """MaxText's model FLOPs of the case's date: 6 x matmul weights (with one vocab x emb
    matrix: tied, or the untied output layer) + attention, causal or full."""
    m = case.model
    mlp_matrices = 3 if m["activation"] == "swiglu" else 2
    per_layer = (m["hidden"] * m["head_dim"] * (2 * m["heads"] + 2 * m["kv_heads"])
                 + mlp_matrices * m["hidden"] * m["mlp"])
    weights = m["layers"] * per_layer + m["hidden"] * m["vocab"]
    attention = ((6 if case.causal_mfu else 12) * m["layers"] * case.seq_len * m["heads"]
                 * m["head_dim"])
    tokens = case.per_chip_batch * _chips(case) * case.seq_len
    return (6 * weights + attention) * tokens


def _chips(case: Case) -> int:
    from k2jax.aot.topology import parse_slice

    return parse_slice(case.topology).devices * case.slices  # tpu7x: 2 devices per chip


def case_config(case: Case, layers: int):
    from k2jax.config import load_config

    m = case.model
    rows = case.per_chip_batch * _chips(case)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [
        f"model.vocab_size={m['vocab']}", f"model.hidden_size={m['hidden']}",
        f"model.intermediate_size={m['mlp']}", f"model.num_layers={layers}",
        f"model.num_heads={m['heads']}", f"model.num_kv_heads={m['kv_heads']}",
        f"model.head_dim={m['head_dim']}", f"model.mlp_activation={m['activation']}",
        f"model.tie_word_embeddings={str(m['tied']).lower()}",
        f"model.max_position_embeddings={case.seq_len}",
        "model.compute_dtype=bfloat16", "model.param_dtype=float32", "model.scan_layers=true",
        f"model.remat={case.remat}", "model.attention=splash",
        f"data.seq_len={case.seq_len}", f"data.global_batch_size={rows}",
        f"data.micro_batch_size={rows}", "mesh.data=1", "mesh.fsdp=-1",
        f"mesh.tensor={case.tensor}", f"mesh.dcn_data={case.slices}",
        # MaxText reduces the gradients of its bf16 weight copies in bf16, and computes the
        # whole logits (no vocabulary tiling in these runs).
        "train.gradient_dtype=bfloat16", "model.loss_chunk_tokens=null",
    ]
    overrides.append(f"train.xla_flags={case.xla_flags}")
    overrides.extend(case.overrides)
    return load_config(os.path.join(repo, "configs", "tiny.yaml"),
                       [o for o in overrides if o is not None])


# Each case's compiled program, xz-compressed, and the key it was compiled from (keys.json,
# k2jax/aot/program_key.py): --stored re-costs them all without compiling, and a run compiles
# only the cases whose key no longer matches.
STORED_HLO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration_hlo")


def set_startup_flags() -> None:
    """Add the cases' start-up flags to LIBTPU_INIT_ARGS (libtpu reads them once, when it
    starts, so they apply to every case of a run): always those of all the cases, so that a
    case compiles the same whichever cases are chosen."""
    startup = " ".join(sorted({c.libtpu_init_args for c in CASES if c.libtpu_init_args}))
    current = os.environ.get("LIBTPU_INIT_ARGS", "")
    if startup and startup not in current:
        os.environ["LIBTPU_INIT_ARGS"] = f"{current} {startup}".strip()


def hlo_name(case: Case, layers: int) -> str:
    return f"calibrate-{case.name}-{layers}l.hlo"


def case_program_key(case: Case, layers: int) -> str:
    """What the case's compile is a function of (its lowered step, flags, start-up flags and
    topology), hashed: lowering takes a second or two, the compile minutes."""
    from k2jax.aot.compile_report import lowered_text
    from k2jax.aot.program_key import program_key
    from k2jax.aot.topology import parse_slice

    config = case_config(case, layers)
    lowered = lowered_text(config, parse_slice(case.topology), case.slices)
    return program_key(lowered, config.train.xla_flags, os.environ.get("LIBTPU_INIT_ARGS", ""),
                       case.topology, case.slices)


def prepare_hlo_dir(hlo_dir: str) -> None:
    """Compiled programs go to `hlo_dir`: found unusable before the first compile, not after
    minutes of it (one line, exit 2)."""
    from k2jax.errors import UserError
    from k2jax.storage import is_remote

    if is_remote(hlo_dir):  # os.makedirs would make a local folder named "gs:"
        raise UserError(f"--hlo-dir {hlo_dir}: expected a local folder (kept programs and "
                        f"their keys are read with local file access)")
    try:
        os.makedirs(hlo_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"--hlo-dir {hlo_dir}: cannot be made a folder ({err.strerror})") from None
    if not os.access(hlo_dir, os.W_OK | os.X_OK):
        raise UserError(f"--hlo-dir {hlo_dir}: this user cannot write there")


def compile_or_keep(case: Case, layers: int, hlo_dir: str, recompile: bool = False,
                    update_stored: bool = False) -> dict:
    """The case's row, from a kept program compiled from the same key by this compiler
    (`hlo_dir`'s, else the repository's), or from a compile into `hlo_dir` (`update_stored`:
    also xz-compressed into the repository's, with its key)."""
    from k2jax.aot.program_key import kept_program, read_program, record_program, same_program
    from k2jax.atomic_write import write_bytes_atomic

    start = time.perf_counter()
    key = case_program_key(case, layers)
    lower_seconds = round(time.perf_counter() - start, 1)
    name = hlo_name(case, layers)
    kept = None if recompile else (kept_program(hlo_dir, name, key)
                                   or kept_program(STORED_HLO, name, key))
    if kept is not None:
        row = run_case(case, layers, os.path.dirname(kept), reuse=True)
        return {**row, "kept": kept, "lower_seconds": lower_seconds}
    os.makedirs(hlo_dir, exist_ok=True)
    row = run_case(case, layers, hlo_dir)
    compiled = os.path.join(hlo_dir, name)
    stored = os.path.join(STORED_HLO, name + ".xz")
    if os.path.exists(compiled):  # not when the compiler ran out of HBM
        record_program(hlo_dir, name, key)
        if os.path.exists(stored):  # a recompile (--recompile, or a changed key)
            row["same_as_stored"] = same_program(compiled, stored)
        if update_stored and "error" not in row:
            packed = lzma.compress(read_program(compiled).encode(), preset=9)
            write_bytes_atomic(stored, packed)
            record_program(STORED_HLO, name, key)
    return {**row, "kept": None, "lower_seconds": lower_seconds}


def run_case(case: Case, layers: int, hlo_dir: Optional[str] = None,
             reuse: bool = False) -> dict:
    from k2jax.aot.chips import chip_for
    from k2jax.aot.collectives import DeviceLayout
    from k2jax.aot.compile_report import compile_report, topology_devices
    from k2jax.aot.program_key import read_program
    from k2jax.aot.step_time import predict
    from k2jax.aot.topology import parse_slice

    tpu_slice = parse_slice(case.topology)
    hlo = os.path.join(hlo_dir or "/tmp", hlo_name(case, layers))
    if reuse and not os.path.exists(hlo) and os.path.exists(hlo + ".xz"):
        hlo += ".xz"  # as stored in STORED_HLO
    start, cpu_start = time.perf_counter(), time.process_time()
    if reuse and not os.path.exists(hlo):  # --reuse never starts a compile by surprise
        return {"case": case.name, "error": f"--reuse: no kept HLO {hlo} (run without --reuse "
                                            f"to compile it)"}
    if reuse:  # an earlier run's compile of the same case
        report = {"bytes_per_chip": float("nan")}
    else:
        report = compile_report(case_config(case, layers), tpu_slice, case.slices,
                                measure_flops=False, hlo_out=hlo)
        if report["hlo_out"] is None:
            return {"case": case.name, "error": "compiler out of HBM",
                    "compile_seconds": round(time.perf_counter() - start, 1)}
    compile_seconds = time.perf_counter() - start
    # CPU seconds of all this process's threads: what the compile costs whatever the load.
    compile_cpu_seconds = time.process_time() - cpu_start
    from k2jax.sharding.mesh import build_mesh

    config = case_config(case, layers)
    mesh = build_mesh(config.mesh, topology_devices(tpu_slice, case.slices))
    chip = chip_for(tpu_slice.generation.name)
    flops = maxtext_flops_per_step(case)
    text = read_program(hlo)
    pred = predict(text, chip, DeviceLayout.from_devices(list(mesh.devices.flat)), flops,
                   _chips(case), layer_trips=(layers, case.model["layers"]))
    if layers < case.model["layers"] and pred["extrapolated_layer_loops"] < 2:
        # The forward and the backward layer scan must both be costed per layer; XLA unrolls
        # a short scan at times (the 2-layer multi-slice compiles), which would count its
        # layers `layers` times only.
        return {"case": case.name,
                "error": f"XLA unrolled a layer scan of the {layers}-layer compile "
                         f"({pred['extrapolated_layer_loops']} of 2 scans left to extrapolate): "
                         f"rerun with more --layers",
                "compile_seconds": round(compile_seconds, 1),
                "compile_cpu_seconds": round(compile_cpu_seconds, 1),
                "cost_seconds": round(time.perf_counter() - start - compile_seconds, 1)}
    published_mfu = published_mfu_of(case, flops, chip.peak_flops)
    published_step = (case.published_step_seconds or
                      (flops / (published_mfu * _chips(case) * chip.peak_flops)
                       if published_mfu else None))
    return {"case": case.name, "topology": case.topology, "slices": case.slices,
            "compiled_layers": layers, "layers": case.model["layers"],
            "published_mfu": published_mfu, "predicted_mfu": pred["predicted_mfu"],
            # = published step / predicted step - 1 (the same model FLOPs on both sides)
            "relative_error": (pred["predicted_mfu"] / published_mfu - 1 if published_mfu
                               else None),
            "predicted_step_seconds": pred["predicted_step_seconds"],
            "published_step_seconds": published_step,
            "published": "step" if case.published_step_seconds else "mfu",
            "compute_seconds": pred["compute_seconds"], "memory_seconds": pred["memory_seconds"],
            "exposed_collective_seconds": pred["exposed_collective_seconds"],
            "collective_seconds": pred["collective_seconds"],
            "host_transfer_seconds": pred["host_transfer_seconds"],
            "exposed_host_transfer_seconds": pred["exposed_host_transfer_seconds"],
            "hbm_gib_per_chip_compiled": report["bytes_per_chip"] / 1024 ** 3,
            "compile_seconds": round(compile_seconds, 1),
            "compile_cpu_seconds": round(compile_cpu_seconds, 1),
            "cost_seconds": round(time.perf_counter() - start - compile_seconds, 1),
            "load_average": round(os.getloadavg()[0], 1), "source": case.source}


def published_mfu_of(case: Case, flops: float, peak_flops: float) -> float:
    """The published MFU, or the one a published step time gives with MaxText's FLOPs."""
    if case.published_step_seconds:
        return flops / (case.published_step_seconds * _chips(case) * peak_flops)
    return case.published_mfu


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['case']} | {r['error']} |"
    return (f"| {r['case']} | {r['published_mfu']:.1%} | {r['predicted_mfu']:.1%} | "
            f"{r['relative_error']:+.1%} | {r['predicted_step_seconds']:.2f} | "
            f"{r['published_step_seconds']:.2f} | {r['compute_seconds']:.2f} / "
            f"{r['memory_seconds']:.2f} / {r['exposed_collective_seconds']:.2f} "
            f"(of {r['collective_seconds']:.2f}) / {r['exposed_host_transfer_seconds']:.2f} "
            f"(of {r['host_transfer_seconds']:.2f}) | {r['compiled_layers']}->{r['layers']} | "
            f"{_time_cell(r)} |")


def _time_cell(r: dict) -> str:
    if r.get("kept"):
        return (f"kept in {os.path.relpath(os.path.dirname(r['kept']))} "
                f"({r['lower_seconds']:.0f} s to lower + {r['cost_seconds']:.0f})")
    stored = {True: ", the stored program", False: ", not the stored program"}.get(
        r.get("same_as_stored"), "")
    return (f"{r['compile_seconds']:.0f} + {r['cost_seconds']:.0f} (load {r['load_average']})"
            f"{stored}")


HEADER = ("| case | published MFU | predicted MFU | rel. error | predicted step s | published "
          "step s | compute / memory / exposed comm (all comm) / exposed host DMA (all) s | "
          "layers compiled->costed | compile + cost s |\n|---|---|---|---|---|---|---|---|---|")


def calibration_cases() -> list:
    return [c for c in CASES if not c.repeats]


def chosen_cases(selection: str):
    """`--cases`: comma-separated 'calibration', 'all' and case names, in CASES' order (None,
    said in one line, for an unknown one)."""
    groups = {"calibration": {c.name for c in calibration_cases()},
              "all": {c.name for c in CASES}}
    names = set()
    unknown = []
    for item in (n for n in selection.split(",") if n):
        if item in groups:
            names |= groups[item]
        elif item in groups["all"]:
            names.add(item)
        else:
            unknown.append(item)
    if unknown:
        print(f"--cases: unknown {unknown} (expected 'calibration', 'all' or case names)",
              file=sys.stderr)
        return None
    return [c for c in CASES if c.name in names]


def error_line(errors: dict) -> str:
    """The run's errors as k2jax/aot/calibration.py records them (mean, spread, range)."""
    from k2jax.aot.calibration import error_summary

    s = error_summary(errors)
    return (f"relative error over {s['cases']} cases: mean {s['mean']:+.1%}, spread "
            f"{s['spread']:.1%}, from {s['min']:+.1%} to {s['max']:+.1%}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of layers, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="calibration",
                        help="comma-separated groups and names: 'calibration' (the "
                             "default: every published recipe once, "
                             f"{len(calibration_cases())} cases), 'all' (also the runs that "
                             f"repeat a recipe at another scale, {len(CASES)} cases), case "
                             "names: "
                             + ", ".join(c.name for c in CASES))
    parser.add_argument("--layers", type=positive_int, default=2,
                        help="scanned layers to compile")
    parser.add_argument("--check-extrapolation", action="store_true",
                        help="also compile a small model at --layers and 2 x --layers and "
                             "compare the extrapolated step with the compiled one")
    parser.add_argument("--hlo-dir", default="/tmp", help="where the compiled HLO is kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--reuse", action="store_true",
                        help="cost the HLO an earlier run left in --hlo-dir instead of compiling "
                             "(a case without one is an error row, not a compile)")
    parser.add_argument("--recompile", action="store_true",
                        help="compile every case, even one whose program is kept (--hlo-dir "
                             "or the repository) compiled from the same lowered program, flags "
                             "and compiler: the cold run")
    parser.add_argument("--update-stored", action="store_true",
                        help=f"keep each program compiled in this run in the repository "
                             f"({STORED_HLO}, xz-compressed, with its key), to commit with "
                             f"the errors it gives")
    parser.add_argument("--stored", action="store_true",
                        help=f"cost the compiled HLO kept in the repository ({STORED_HLO}): "
                             f"--reuse --hlo-dir {STORED_HLO}, in seconds")
    args = parser.parse_args(argv)
    if args.stored:
        args.reuse, args.hlo_dir = True, STORED_HLO
    if argv is None and not args.reuse:  # this process is the command, and it compiles
        from k2jax.aot.fast_malloc import restart_with_fast_malloc

        restart_with_fast_malloc()  # a fifth of a compile is malloc (k2jax/aot/fast_malloc.py)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    chosen = chosen_cases(args.cases)
    if chosen is None:
        return 2
    if not args.reuse:
        prepare_hlo_dir(args.hlo_dir)
    set_startup_flags()
    if not args.json and chosen:
        print(HEADER)
    spent = cpu = 0.0
    kept = failed = 0
    errors = {}
    for case in chosen:
        layers = max(args.layers, case.min_compile_layers)
        if args.reuse:
            row = run_case(case, layers, args.hlo_dir, reuse=True)
        else:
            row = compile_or_keep(case, layers, args.hlo_dir, args.recompile,
                                  args.update_stored)
        kept += bool(row.get("kept"))
        failed += "error" in row
        spent += (row.get("lower_seconds", 0.0) + row.get("compile_seconds", 0.0)
                  + row.get("cost_seconds", 0.0))
        cpu += row.get("compile_cpu_seconds", 0.0)
        if row.get("relative_error") is not None:
            errors[case.name] = row["relative_error"]
        print(json.dumps(row) if args.json else format_row(row), flush=True)
    if chosen and not args.json:
        from k2jax.aot.fast_malloc import malloc_in_use

        how = (" (reused HLO)" if args.reuse else
               f" ({kept} of them kept programs of the same key, not compiled)" if kept else "")
        print(f"{len(chosen)} cases{how}: {spent:.0f} s of lowering, compiling and costing "
              f"({cpu:.0f} CPU s compiling), load average now {os.getloadavg()[0]:.1f}, "
              f"malloc {malloc_in_use()}")
        if errors:
            print(error_line(errors))
    if failed:
        print(f"{failed} of {len(chosen)} cases not costed (their rows say why)", file=sys.stderr)
    if args.check_extrapolation:
        check = check_extrapolation(args.layers, args.hlo_dir, args.reuse)
        print(json.dumps(check) if args.json else
              f"extrapolation check ({EXTRAPOLATION_CHECK.name}): {check['compiled_layers']} "
              f"layers costed at {check['costed_layers']}: {check['extrapolated_seconds']:.4f} s; "
              f"compiled at {check['costed_layers']}: {check['compiled_seconds']:.4f} s "
              f"({check['relative_difference']:+.2%})")
    return 1 if failed else 0


# A small model (fast to compile) for checking the per-layer extrapolation: the same step
# compiled at L and 2L layers; the L compile costed at 2L should predict the 2L compile.
EXTRAPOLATION_CHECK = Case("check-1b-v5p-8", "v5p-8", 1,
                           dict(hidden=2048, heads=16, kv_heads=16, head_dim=128, mlp=5632,
                                layers=0, vocab=32000, activation="swiglu", tied=False),
                           2048, 4, "save_dots_no_batch", 1, 0.0, True,
                           "none: an extrapolation check")


def _predicted_seconds(row: dict) -> float:
    from k2jax.errors import UserError

    if "error" in row:
        raise UserError(f"--check-extrapolation: {row['error']}")
    return row["predicted_step_seconds"]


def check_extrapolation(layers: int, hlo_dir: Optional[str], reuse: bool) -> dict:
    short = dataclasses.replace(EXTRAPOLATION_CHECK, model={**EXTRAPOLATION_CHECK.model,
                                                            "layers": 2 * layers})
    extrapolated, compiled = (_predicted_seconds(run_case(short, n, hlo_dir, reuse))
                              for n in (layers, 2 * layers))
    return {"case": short.name, "compiled_layers": layers, "costed_layers": 2 * layers,
            "extrapolated_seconds": extrapolated, "compiled_seconds": compiled,
            "relative_difference": extrapolated / compiled - 1}


if __name__ == "__main__":
    from k2jax.errors import UserError
    from k2jax.storage_errors import user_failure

    try:
        raise SystemExit(main())
    except UserError as err:  # bad input (a damaged keys file, a flag libtpu refuses): one line
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    except Exception as err:  # a full disk or quota under --hlo-dir: one line, as `k2jax` does
        problem = user_failure(err)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
