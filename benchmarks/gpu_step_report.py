"""The JSON and the table of benchmarks/gpu_step.py: headline ratio k2jax/PyTorch, MFU against
the chip's bf16 peak, attention, numerics, generation."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def summary(results: dict) -> dict:
    """The headline figures: tokens/s and MFU of each step, and their ratio."""
    ours, theirs = results.get("train_jax", {}), results.get("train_torch", {})
    out = {}
    for name, r in (("k2jax", ours), ("pytorch", theirs)):
        if "step_s" in r:
            out[name] = {"tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"],
                         "tflops": r["model_flops"] / r["step_s"] / 1e12,
                         "mfu": r["model_flops"] / r["step_s"] / r["peak_flops"],
                         "peak_gib": r.get("peak_gib")}
    if "k2jax" in out and "pytorch" in out:
        out["ratio_tokens_per_s"] = out["k2jax"]["tokens_per_s"] / out["pytorch"]["tokens_per_s"]
    return out


def write_report(args, results: dict, started: float) -> dict:
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "dry": args.dry, "layers": args.layers, "batch_requested": args.batch,
              "host": platform.node(), "cpus": os.cpu_count(), "versions": versions(),
              "wall_s": time.time() - started, "summary": summary(results), "parts": results}
    path = Path(args.out)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1))
    os.replace(temporary, path)  # atomically: a half-written report never stands
    return report


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    parts, head = report["parts"], report["summary"]
    device = next((r["device"] for r in parts.values() if "device" in r), "?")
    print(f"\n{report['date']}, {device}, {report['layers']} K2-width layers, "
          f"versions {report['versions']}, {report['wall_s']:.0f} s in all")
    print("| train step | batch x seq | step s | tokens/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, key in (("k2jax", "train_jax"), ("PyTorch", "train_torch")):
        r, h = parts.get(key, {}), head.get("k2jax" if key == "train_jax" else "pytorch")
        if h is None:
            print(f"| {name} | failed: {r.get('error', '?')[:150]} |")
            continue
        tokens = round(r["tokens_per_s"] * r["step_s"])
        print(f"| {name} | {tokens} tokens | {h['step_s']:.3f} | {h['tokens_per_s']:,.0f} | "
              f"{h['tflops']:.0f} | {h['mfu']:.1%} | {_fmt(h['peak_gib'], '.1f')} |")
    if "ratio_tokens_per_s" in head:
        print(f"k2jax / PyTorch tokens/s: {head['ratio_tokens_per_s']:.2f}")
    for row in parts.get("attention", {}).get("rows", []):
        cells = "; ".join(f"{k} {v['ms']:.2f} ms ({v['tflops']:.0f} TFLOP/s)"
                          for k, v in row.items() if isinstance(v, dict))
        print(f"attention fwd+bwd seq {row['seq']} x batch {row['batch']}: {cells}")
    numerics = parts.get("numerics", {})
    if "float32" in numerics:
        step = numerics["mesh_step"]
        print(f"numerics: fp32 max |logit diff| {numerics['float32']['max_abs_logit_diff']:.2e} "
              f"(ok {numerics['fp32_logits_ok']}); bf16 loss - fp32 loss: k2jax "
              f"{numerics['bf16_loss_diff_k2jax']:.2e}, torch "
              f"{numerics['bf16_loss_diff_torch']:.2e};"
              f" 1-device mesh step vs CPU: loss {step['loss_rel_diff']:.1e}, grad norm "
              f"{step['grad_norm_rel_diff']:.1e}, update {step['update_rel_diff']:.1e} "
              f"(ok {step['ok']})")
    for row in parts.get("generate", {}).get("rows", []):
        print(f"{row['what']}: k2jax {row['k2jax']:.1f}, transformers {row['transformers']:.1f}"
              f" ({row['k2jax'] / row['transformers']:.2f}x)")
    for name, r in parts.items():
        if "error" in r:
            print(f"{name} FAILED: {r['error'][:300]}")
