"""Calibrate the TPU step-time model (k2jax/aot/step_time.py) against published TPU results.

Builds in k2jax the dense LLaMA-style runs MaxText publishes (AI-Hypercomputer/maxtext: the
v5p and v5e READMEs and their configs/*.sh, the Llama 2 70B v5p-512 config; their batch,
sequence length, remat policy and ICI/DCN sharding as published), AOT-compiles each for its
TPU topology with libtpu (no TPU needed), and prints predicted against published MFU.

Compile cost: each run is compiled with `--layers` (default 2) scanned layers and its
layer loop is costed at the published layer count (the scan body is one layer, so the
extrapolation is exact per layer: `StepTimeModel(layer_trips=...)`); `--check-extrapolation`
also compiles a small model at both layer counts and compares. A compile in which XLA unrolled
the forward or the backward layer scan (the 2-layer multi-slice ones) is an error row: rerun
it with more `--layers`.

MFU is MaxText's: 6 x matmul weights + attention (12 L S H D per token, full attention, for
results published before MaxText's PR #1988 of July 2025; 6 L S H D, causal, after).

    JAX_PLATFORMS=cpu python benchmarks/calibrate_step_model.py [--cases NAME,...] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

# MaxText global_parameter_scale models (base.yml: emb 2048, heads 16, mlp 7168, 16 layers,
# head_dim 128, vocab 32000, scaled by pyconfig.get_individual_scales): 32 -> (8192, 64 heads,
# 28672, 32 layers), 64 -> (8192, 64, 28672, 64), 128 -> (8192, 128, 57344, 64).
SYNTHETIC = {
    "32b": dict(hidden=8192, heads=64, kv_heads=64, mlp=28672, layers=32, vocab=32000),
    "64b": dict(hidden=8192, heads=64, kv_heads=64, mlp=28672, layers=64, vocab=32000),
    "128b": dict(hidden=8192, heads=128, kv_heads=128, mlp=57344, layers=64, vocab=32000),
}
LLAMA2_70B = dict(hidden=8192, heads=64, kv_heads=8, mlp=28672, layers=80, vocab=32000)


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
    causal_mfu: bool  # the publication counts causal attention FLOPs (after PR #1988)
    source: str


CASES = [
    # remat_policy=minimal is jax's checkpoint_dots_with_no_batch_dims = k2jax save_dots_no_batch.
    Case("32b-v5p-128", "v5p-128", 1, SYNTHETIC["32b"], 2048, 7, "save_dots_no_batch", 4,
         0.7147, False, "maxtext configs/v5p/README.md, 32b.sh"),
    Case("64b-v5p-128", "v5p-128", 1, SYNTHETIC["64b"], 2048, 3, "save_dots_no_batch", 4,
         0.7031, False, "maxtext configs/v5p/README.md, 64b.sh"),
    Case("128b-v5p-256", "v5p-256", 1, SYNTHETIC["128b"], 2048, 1, "save_dots_no_batch", 8,
         0.6868, False, "maxtext configs/v5p/README.md, 128b.sh"),
    Case("32b-v5e-256", "v5e-256", 1, SYNTHETIC["32b"], 2048, 4, "full", 1, 0.6686, False,
         "maxtext configs/v5e/README.md, 32b.sh"),
    Case("64b-v5e-256", "v5e-256", 1, SYNTHETIC["64b"], 2048, 2, "full", 1, 0.5990, False,
         "maxtext configs/v5e/README.md, 64b.sh"),
    # save_dot_except_mlpwi saves q/k/v, attention out and mlp out projections = save_qkv_out.
    # "512 chips" in tiering.md; the config says 1 x v5p-512 (256 chips) for a 4M-token batch.
    Case("llama2-70b-v5p-512", "v5p-512", 1, LLAMA2_70B, 4096, 4, "save_qkv_out", 1, 0.654,
         True, "maxtext docs/reference/models/tiering.md, configs/v5p/llama2_70b.sh"),
    Case("32b-2xv5p-128", "v5p-128", 2, SYNTHETIC["32b"], 2048, 7, "save_dots_no_batch", 4,
         0.6943, False, "maxtext configs/v5p/README.md, 32b.sh (2 slices, dcn data)"),
    Case("64b-2xv5e-256", "v5e-256", 2, SYNTHETIC["64b"], 2048, 2, "full", 1, 0.5666, False,
         "maxtext configs/v5e/README.md, 64b.sh (2 slices, dcn data)"),
]


def maxtext_flops_per_step(case: Case) -> float:
    m = case.model
    head_dim = 128  # every MaxText model here
    per_layer = m["hidden"] * head_dim * (2 * m["heads"] + 2 * m["kv_heads"]) + 3 * m["hidden"] * m["mlp"]
    weights = m["layers"] * per_layer + m["hidden"] * m["vocab"]
    attention = (6 if case.causal_mfu else 12) * m["layers"] * case.seq_len * m["heads"] * head_dim
    chips = _chips(case)
    tokens = case.per_chip_batch * chips * case.seq_len
    return (6 * weights + attention) * tokens


def _chips(case: Case) -> int:
    from k2jax.aot.topology import parse_slice

    return parse_slice(case.topology).chips * case.slices


def case_config(case: Case, layers: int):
    from k2jax.config import load_config

    m = case.model
    rows = case.per_chip_batch * _chips(case)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [
        f"model.vocab_size={m['vocab']}", f"model.hidden_size={m['hidden']}",
        f"model.intermediate_size={m['mlp']}", f"model.num_layers={layers}",
        f"model.num_heads={m['heads']}", f"model.num_kv_heads={m['kv_heads']}",
        "model.head_dim=128" if m["hidden"] != 128 * m["heads"] else None,
        f"model.max_position_embeddings={case.seq_len}",
        "model.compute_dtype=bfloat16", "model.param_dtype=float32", "model.scan_layers=true",
        f"model.remat={case.remat}", "model.attention=splash",
        f"data.seq_len={case.seq_len}", f"data.global_batch_size={rows}",
        f"data.micro_batch_size={rows}", "mesh.data=1", "mesh.fsdp=-1",
        f"mesh.tensor={case.tensor}", f"mesh.dcn_data={case.slices}",
        # MaxText reduces the gradients of its bf16 weight copies in bf16.
        "train.gradient_dtype=bfloat16",
    ]
    return load_config(os.path.join(repo, "configs", "tiny.yaml"),
                       [o for o in overrides if o is not None])


def run_case(case: Case, layers: int, hlo_dir: Optional[str] = None,
             reuse: bool = False) -> dict:
    from k2jax.aot.chips import chip_for
    from k2jax.aot.collectives import DeviceLayout
    from k2jax.aot.compile_report import compile_report, topology_devices
    from k2jax.aot.step_time import predict
    from k2jax.aot.topology import parse_slice

    tpu_slice = parse_slice(case.topology)
    hlo = os.path.join(hlo_dir or "/tmp", f"calibrate-{case.name}-{layers}l.hlo")
    start = time.perf_counter()
    if reuse and os.path.exists(hlo):  # an earlier run's compile of the same case
        report = {"bytes_per_chip": float("nan")}
    else:
        report = compile_report(case_config(case, layers), tpu_slice, case.slices,
                                measure_flops=False, hlo_out=hlo)
        if report["hlo_out"] is None:
            return {"case": case.name, "error": "compiler out of HBM"}
    compile_seconds = time.perf_counter() - start
    from k2jax.sharding.mesh import build_mesh

    config = case_config(case, layers)
    mesh = build_mesh(config.mesh, topology_devices(tpu_slice, case.slices))
    chip = chip_for(tpu_slice.generation.name)
    flops = maxtext_flops_per_step(case)
    with open(hlo) as f:
        text = f.read()
    pred = predict(text, chip, DeviceLayout.from_devices(list(mesh.devices.flat)), flops,
                   _chips(case), layer_trips=(layers, case.model["layers"]))
    if layers < case.model["layers"] and pred["extrapolated_layer_loops"] < 2:
        # The forward and the backward layer scan must both be costed per layer; XLA unrolls
        # a short scan at times (the 2-layer multi-slice compiles), which would count its
        # layers `layers` times only.
        return {"case": case.name,
                "error": f"XLA unrolled a layer scan of the {layers}-layer compile "
                         f"({pred['extrapolated_layer_loops']} of 2 scans left to extrapolate): "
                         f"rerun with --layers {case.model['layers']}"}
    return {"case": case.name, "topology": case.topology, "slices": case.slices,
            "compiled_layers": layers, "layers": case.model["layers"],
            "published_mfu": case.published_mfu, "predicted_mfu": pred["predicted_mfu"],
            "relative_error": (pred["predicted_mfu"] / case.published_mfu - 1
                               if case.published_mfu else None),
            "predicted_step_seconds": pred["predicted_step_seconds"],
            "published_step_seconds": (flops / (case.published_mfu * _chips(case)
                                                * chip.peak_flops) if case.published_mfu
                                       else None),
            "compute_seconds": pred["compute_seconds"], "memory_seconds": pred["memory_seconds"],
            "exposed_collective_seconds": pred["exposed_collective_seconds"],
            "collective_seconds": pred["collective_seconds"],
            "hbm_gib_per_chip_compiled": report["bytes_per_chip"] / 1024 ** 3,
            "compile_seconds": round(compile_seconds, 1), "source": case.source}


def format_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['case']} | {r['error']} |"
    return (f"| {r['case']} | {r['published_mfu']:.1%} | {r['predicted_mfu']:.1%} | "
            f"{r['relative_error']:+.1%} | {r['predicted_step_seconds']:.2f} | "
            f"{r['published_step_seconds']:.2f} | {r['compute_seconds']:.2f} / "
            f"{r['memory_seconds']:.2f} / {r['exposed_collective_seconds']:.2f} "
            f"(of {r['collective_seconds']:.2f}) | {r['compiled_layers']}->{r['layers']} | "
            f"{r['compile_seconds']:.0f} |")


HEADER = ("| case | published MFU | predicted MFU | rel. error | predicted step s | published "
          "step s | compute / memory / exposed comm s (all comm) | layers compiled->costed | "
          "compile s |\n|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="comma-separated case names (default: all): "
                        + ", ".join(c.name for c in CASES))
    parser.add_argument("--layers", type=int, default=2, help="scanned layers to compile")
    parser.add_argument("--check-extrapolation", action="store_true",
                        help="also compile a small model at --layers and 2 x --layers and "
                             "compare the extrapolated step with the compiled one")
    parser.add_argument("--hlo-dir", default="/tmp", help="where the compiled HLO is kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--reuse", action="store_true",
                        help="cost the HLO an earlier run left in --hlo-dir instead of compiling")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    chosen = CASES
    if args.cases:
        names = args.cases.split(",")
        unknown = [n for n in names if n not in {c.name for c in CASES}]
        if unknown:
            print(f"--cases: unknown {unknown}", file=sys.stderr)
            return 2
        chosen = [c for c in CASES if c.name in names]
    if args.cases == "":
        chosen = []
    if not args.json and chosen:
        print(HEADER)
    for case in chosen:
        row = run_case(case, args.layers, args.hlo_dir, args.reuse)
        print(json.dumps(row) if args.json else format_row(row), flush=True)
    if args.check_extrapolation:
        check = check_extrapolation(args.layers, args.hlo_dir, args.reuse)
        print(json.dumps(check) if args.json else
              f"extrapolation check ({EXTRAPOLATION_CHECK.name}): {check['compiled_layers']} "
              f"layers costed at {check['costed_layers']}: {check['extrapolated_seconds']:.4f} s; "
              f"compiled at {check['costed_layers']}: {check['compiled_seconds']:.4f} s "
              f"({check['relative_difference']:+.2%})")
    return 0


# A small model (fast to compile) for checking the per-layer extrapolation: the same step
# compiled at L and 2L layers; the L compile costed at 2L should predict the 2L compile.
EXTRAPOLATION_CHECK = Case("check-1b-v5p-8", "v5p-8", 1,
                           dict(hidden=2048, heads=16, kv_heads=16, mlp=5632, layers=0,
                                vocab=32000), 2048, 4, "save_dots_no_batch", 1, 0.0, True,
                           "none: an extrapolation check")


def check_extrapolation(layers: int, hlo_dir: Optional[str], reuse: bool) -> dict:
    short = dataclasses.replace(EXTRAPOLATION_CHECK, model={**EXTRAPOLATION_CHECK.model,
                                                            "layers": 2 * layers})
    extrapolated = run_case(short, layers, hlo_dir, reuse)["predicted_step_seconds"]
    compiled = run_case(short, 2 * layers, hlo_dir, reuse)["predicted_step_seconds"]
    return {"case": short.name, "compiled_layers": layers, "costed_layers": 2 * layers,
            "extrapolated_seconds": extrapolated, "compiled_seconds": compiled,
            "relative_difference": extrapolated / compiled - 1}


if __name__ == "__main__":
    raise SystemExit(main())
