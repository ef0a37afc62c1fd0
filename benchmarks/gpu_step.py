"""k2jax on one NVIDIA GPU beside PyTorch on the same chip, in one run (< 8 min on an H100).

Parts, each in a fresh subprocess (so each framework has the GPU's memory to itself and reports
its own peak), results gathered into one JSON and a table:
  train_jax    the train step as `k2jax train` compiles it (build_training_setup: bf16 compute,
               fp32 master weights, fp32 gradients, AdamW, clipping, remat as configured) for
               K2-shaped layers at full width (configs/k2-65b.yaml's hidden, heads, MLP and
               vocabulary, its seq_len; --layers, --batch rows): step s, tokens/s, TFLOP/s, MFU, peak memory,
               and the compiled step's own cost analysis;
  train_torch  transformers' LlamaForCausalLM with the same config and batch: fp32 weights,
               bf16 autocast, SDPA (flash forced where it runs), fused AdamW, clipping,
               activation checkpointing when k2jax remats (--torch-compile: torch.compile);
  attention    causal attention forward+backward, bf16, at K2's and K2-Chat's seq_len: k2jax's GPU path
               (cuDNN), k2jax's XLA path and torch SDPA;
  numerics     a tiny model converted from transformers: fp32 logits (<= 1e-4 at "highest"
               matmul precision), bf16 losses, and one train step on a 1-device GPU mesh
               against the same step on the CPU;
  generate     decode and scoring speed against transformers (benchmarks/generate.py's ~100 M
               model on this device).

    python benchmarks/gpu_step.py [--out gpu_step.json] [--layers 2] [--batch 16]
    python benchmarks/gpu_step.py --dry   # the whole script on the CPU at tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
MARK = "GPU_STEP_RESULT "
PARTS = ("train_jax", "train_torch", "attention", "numerics", "generate")
K2_CONFIG, K2_CHAT_CONFIG = REPO / "configs/k2-65b.yaml", REPO / "configs/k2-chat.yaml"
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size")


def k2_width() -> list[str]:
    """K2's layer width and vocabulary, as overrides read from configs/k2-65b.yaml."""
    from k2jax.config import load_config

    model = load_config(str(K2_CONFIG)).model
    return [f"model.{key}={getattr(model, key)}" for key in WIDTH_KEYS]


def tiny_width() -> list[str]:
    # head dim 64: a size cuDNN's flash attention surely takes (the numerics part runs it on a
    # GPU); K2's vocabulary, so the embedding and logits keep their real shape.
    vocab = next(o for o in k2_width() if o.startswith("model.vocab_size="))
    return ["model.hidden_size=256", "model.intermediate_size=688", "model.num_heads=4",
            "model.num_kv_heads=2", vocab]
GIB = 1024 ** 3


def median_time(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_config(args):
    from k2jax.config import load_config

    width = tiny_width() if args.dry else k2_width()
    seq = 64 if args.dry else load_config(str(K2_CONFIG)).data.seq_len
    return load_config(str(K2_CONFIG), width + [
        f"model.num_layers={args.layers}", f"data.seq_len={seq}",
        f"data.global_batch_size={args.batch}", f"data.micro_batch_size={args.batch}",
        "data.source=synthetic", "train.loss_normalization=global",
        "optimizer.warmup_steps=1", f"model.attention={args.attention}"])


def chip_peak(dry: bool) -> tuple[str, float]:
    """(device name, bf16 dense peak FLOP/s): the chip's from its name; on a CPU (--dry) the
    measured fp32 matmul rate."""
    import jax

    from k2jax.train.flops import measure_matmul_peak, peak_flops_for

    device = jax.devices()[0]
    peak = peak_flops_for(device)
    if peak is None:
        peak = measure_matmul_peak(size=512 if dry else 4096)
    return str(getattr(device, "device_kind", device.platform)), float(peak)


def jax_peak_memory():
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GIB


def part_train_jax(args) -> dict:
    import jax
    import numpy as np

    from k2jax.train.flops import flops_per_token
    from k2jax.train.setup import build_training_setup

    config = train_config(args)
    setup = build_training_setup(config, jax.devices()[:1])
    start = time.perf_counter()
    compiled = setup.lower().compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else (cost or {})
    state = setup.init_state()
    rng = np.random.default_rng(0)
    shape = (setup.padding.padded_rows, config.data.seq_len)
    batch = jax.device_put({"tokens": rng.integers(0, config.model.vocab_size, shape)
                            .astype(np.int32), "loss_mask": np.ones(shape, np.float32)},
                           setup.batch_sharding)
    ceiling = np.float32(np.inf)
    losses = []

    def one_step():
        nonlocal state
        state, metrics = compiled(state, batch, ceiling)
        losses.append(float(metrics["loss"]))  # waits for the step

    step_s = median_time(one_step, 2, args.steps)
    from k2jax.model.attention_core import resolve_attention_impl

    q = jax.ShapeDtypeStruct((1, 1, 1, config.model.resolved_head_dim),
                             jax.numpy.dtype(config.model.compute_dtype))
    tokens = shape[0] * shape[1]
    flops = flops_per_token(config.model, config.data.seq_len) * tokens
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "model_flops": flops,
            "compile_s": compile_s, "peak_gib": jax_peak_memory(), "losses": losses,
            "attention": resolve_attention_impl(config.model.attention, q),
            "remat": config.model.remat,
            "hlo_flops": cost.get("flops"), "hlo_bytes": cost.get("bytes accessed")}


def torch_device(torch, dry: bool):
    return torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")


def part_train_torch(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from k2jax.train.flops import flops_per_token

    config = train_config(args)
    m, data = config.model, config.data
    device = torch_device(torch, args.dry)
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=False,
        attn_implementation="sdpa")
    with device:  # initialised on the device: fp32 master weights
        model = LlamaForCausalLM(hf_config)
    if m.remat != "none":
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    o = config.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.peak_lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, weight_decay=o.weight_decay,
                                  fused=device.type == "cuda")
    run = torch.compile(model) if args.torch_compile else model
    tokens = torch.randint(0, m.vocab_size, (args.batch, data.seq_len), device=device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else None
    losses = []

    def one_step():
        with sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = run(input_ids=tokens, labels=tokens).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # waits for the step

    try:
        one_step()
    except RuntimeError as err:  # flash refused (a mask, a dtype): SDPA's own choice instead
        if kernel is None or "out of memory" in str(err).lower():
            raise
        kernel, sdpa = None, f"default (flash refused: {str(err).splitlines()[0][:120]})"
    else:
        sdpa = "flash" if kernel else "default (CPU)"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = median_time(one_step, 1, args.steps)
    tokens_n = args.batch * data.seq_len
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return {"step_s": step_s, "tokens_per_s": tokens_n / step_s, "losses": losses,
            "model_flops": flops_per_token(m, data.seq_len) * tokens_n, "peak_gib": peak,
            "sdpa": sdpa, "checkpointing": m.remat != "none", "compiled": args.torch_compile,
            "torch": torch.__version__}


def attention_flops(batch, seq, heads, head_dim) -> float:
    """Causal forward + backward: 4 B H S^2 D / 2 forward, 2.5x that backward."""
    return 3.5 * 4 * batch * heads * seq * seq * head_dim / 2


def part_attention(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from k2jax.kernels.gpu_attention import gpu_attention
    from k2jax.model.attention_core import xla_attention

    heads, head_dim = (2, 64) if args.dry else (64, 128)
    from k2jax.config import load_config

    lengths = (128, 256) if args.dry else (load_config(str(K2_CONFIG)).data.seq_len,
                                           load_config(str(K2_CHAT_CONFIG)).data.seq_len)
    tokens = 512 if args.dry else 16384
    device = torch_device(torch, args.dry)
    implementations = {"k2jax cudnn": functools.partial(
        gpu_attention, implementation="xla" if args.dry else "cudnn"),
        "k2jax xla": xla_attention}
    rows = []
    for seq in lengths:
        batch = max(1, tokens // seq)
        rng = np.random.default_rng(seq)
        q, k, v, do = (rng.standard_normal((batch, seq, heads, head_dim), np.float32)
                       for _ in range(4))
        flops = attention_flops(batch, seq, heads, head_dim)
        row = {"seq": seq, "batch": batch, "heads": heads, "head_dim": head_dim}
        for name, attend in implementations.items():
            fwd_bwd = jax.jit(lambda q, k, v, do, attend=attend:
                              jax.vjp(attend, q, k, v)[1](do))
            args_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do)]
            seconds = median_time(lambda: jax.block_until_ready(fwd_bwd(*args_bf16)), 2, 10)
            row[name] = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}
        tq, tk, tv, tdo = (torch.tensor(x, device=device, dtype=torch.bfloat16).transpose(1, 2)
                           for x in (q, k, v, do))
        tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_()

        def torch_fwd_bwd():
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            torch.autograd.grad(out, (tq, tk, tv), tdo)
            if device.type == "cuda":
                torch.cuda.synchronize()

        seconds = median_time(torch_fwd_bwd, 2, 10)
        row["torch sdpa"] = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}
        rows.append(row)
    return {"rows": rows, "k2jax_gpu_path": "xla fallback (--dry)" if args.dry else "cudnn"}


def tiny_hf_model(torch, config, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = config.model
    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=False,
        attn_implementation="sdpa", initializer_range=0.05)  # logits of a few units
    return LlamaForCausalLM(hf_config).to(device).eval()


def part_numerics(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from k2jax.config import load_config
    from k2jax.eval.k2jax_forward import k2jax_forward
    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in the fp32 check
    device = torch_device(torch, args.dry)
    config = load_config(str(REPO / "configs/tiny.yaml"), tiny_width() + ["model.num_layers=2"])
    model = tiny_hf_model(torch, config, device)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    tokens = np.random.default_rng(0).integers(3, config.model.vocab_size, (2, 64))
    tokens_t = torch.tensor(tokens, device=device)
    with torch.no_grad():
        hf32 = model(tokens_t).logits.float().cpu().numpy()
        hf_loss32 = float(model(tokens_t, labels=tokens_t).loss)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hf_loss16 = float(model(tokens_t, labels=tokens_t).loss)
    result = {}
    for dtype in ("float32", "bfloat16"):
        cfg = model_config_from_hf(model.config.to_dict(), param_dtype="float32",
                                   compute_dtype=dtype, remat="none", attention="auto")
        params = jax.tree.map(jnp.asarray, params_from_hf(weights.__getitem__, cfg))
        logits, _ = k2jax_forward(params, cfg, tokens)
        logp = jax.nn.log_softmax(jnp.asarray(logits[:, :-1], jnp.float32), axis=-1)
        loss = -float(jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), -1)))
        result[dtype] = {"loss": loss, "max_abs_logit_diff": float(np.abs(logits - hf32).max())}
    result["fp32_logits_ok"] = result["float32"]["max_abs_logit_diff"] <= 1e-4
    result.update(hf_loss_fp32=hf_loss32, hf_loss_bf16=hf_loss16,
                  bf16_loss_diff_k2jax=abs(result["bfloat16"]["loss"] - hf_loss32),
                  bf16_loss_diff_torch=abs(hf_loss16 - hf_loss32))
    result["mesh_step"] = mesh_step_vs_cpu(config, weights, model.config.to_dict())
    return result


def mesh_step_vs_cpu(config, weights, hf_dict) -> dict:
    """One train step (bf16 compute) on a 1-device mesh of the default device (the GPU) and
    the same step on a 1-device CPU mesh, from the same converted weights and batch."""
    import dataclasses

    import jax
    import numpy as np

    from k2jax.hf.name_map import params_from_hf
    from k2jax.train.setup import build_training_setup

    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, seq_len=64, global_batch_size=4, micro_batch_size=4))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.model.vocab_size, (4, 64)).astype(np.int32)
    out = {}
    for where, device, attention in (("device", jax.devices()[0], "auto"),
                                     ("cpu", jax.devices("cpu")[0], "xla")):
        model = dataclasses.replace(config.model, compute_dtype="bfloat16", attention=attention)
        cfg = dataclasses.replace(config, model=model)
        setup = build_training_setup(cfg, [device])
        params = params_from_hf(weights.__getitem__, model)
        # Step 10 of the warm-up: a learning rate that moves the weights (step 0's is 0).
        state = setup.init_state(jax.tree.map(np.asarray, params), start_step=10)
        batch = jax.device_put({"tokens": tokens, "loss_mask": np.ones_like(tokens, np.float32)},
                               setup.batch_sharding)
        state, metrics = setup.step(state, batch, np.float32(np.inf))
        out[where] = ({k: float(metrics[k]) for k in ("loss", "grad_norm", "update_norm")},
                      [np.asarray(x) for x in jax.tree.leaves(state.params)])
    (dev, dev_params), (cpu, cpu_params) = out["device"], out["cpu"]
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    update_diff = (sum(float(np.sum((a - c) ** 2)) for a, c in zip(dev_params, cpu_params))
                   / max(sum(float(np.sum((c - b) ** 2)) for c, b in
                             zip(cpu_params, before)), 1e-30)) ** 0.5
    loss_rel = abs(dev["loss"] - cpu["loss"]) / abs(cpu["loss"])
    grad_rel = abs(dev["grad_norm"] - cpu["grad_norm"]) / cpu["grad_norm"]
    return {"device": dev, "cpu": cpu, "loss_rel_diff": loss_rel, "grad_norm_rel_diff": grad_rel,
            "update_rel_diff": update_diff, "ok": loss_rel <= 1e-2 and grad_rel <= 3e-2}


def part_generate(args) -> dict:
    import torch

    import generate as bench

    device = torch_device(torch, args.dry)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default fp32 dots on a GPU
    options = bench.parse_args(["--repeats", "3"] + (
        ["--batch", "2", "--new-tokens", "8", "--requests", "4", "--context-len", "48",
         "--score-batch", "2", "--prompt-len", "16"] if args.dry else
        ["--batch", "8", "--new-tokens", "64", "--requests", "32", "--score-batch", "8",
         "--ab"]))
    shape = bench.SHAPE_TINY if args.dry else bench.SHAPE_100M
    rows = bench.speed_comparison(options, device=str(device), shape=shape)
    return {"rows": [{"what": w, "k2jax": a, "transformers": b} for w, a, b in rows]}


def run_part(args) -> None:
    import jax

    name, peak = chip_peak(args.dry)
    result = globals()[f"part_{args.part}"](args)
    result.update(device=name, peak_flops=peak, jax=jax.__version__)
    print(MARK + json.dumps(result), flush=True)


def child(args, part: str, **changes) -> dict:
    """`part` in a fresh process; its result, or {"error": last lines} when it failed."""
    argv = [sys.executable, __file__, "--part", part]
    options = {**vars(args), **changes}
    for key in ("layers", "batch", "steps", "attention"):
        argv += [f"--{key}", str(options[key])]
    argv += ["--dry"] * options["dry"] + ["--torch-compile"] * options["torch_compile"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if args.dry:
        env["JAX_PLATFORMS"] = "cpu"
    else:  # the train step may take most of the GPU; the mixed parts share it with torch
        env.update({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"} if part == "train_jax" else
                   {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=args.part_timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        return {"error": " | ".join(tail), "wall_s": time.perf_counter() - start}
    return {**json.loads(lines[-1][len(MARK):]), "wall_s": time.perf_counter() - start}


def out_of_memory(result: dict) -> bool:
    text = result.get("error", "").lower()
    return "resource_exhausted" in text or "out of memory" in text


def train_both(args) -> dict:
    """k2jax's step, halving the batch while it runs out of memory; then PyTorch at the same
    batch (halving further if it alone runs out)."""
    batch, results = args.batch, {}
    while True:
        results["train_jax"] = child(args, "train_jax", batch=batch)
        if not out_of_memory(results["train_jax"]) or batch == 1:
            break
        batch //= 2
        print(f"k2jax step out of memory: batch {batch}", flush=True)
    while True:
        results["train_torch"] = child(args, "train_torch", batch=batch)
        if not out_of_memory(results["train_torch"]) or batch == 1:
            break
        batch //= 2
        print(f"PyTorch step out of memory: batch {batch}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (a rehearsal)")
    parser.add_argument("--layers", type=int, default=None, help="default 2 (--dry: 2)")
    parser.add_argument("--batch", type=int, default=None, help="rows of seq 2048; default 16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--attention", default="auto", help="model.attention of the step")
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--out", default="gpu_step.json")
    parser.add_argument("--part-timeout", type=int, default=400)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.layers = args.layers or 2
    args.batch = args.batch or (2 if args.dry else 16)
    if args.part:
        run_part(args)
        return 0
    from gpu_step_report import print_table, write_report

    started = time.time()
    wanted = args.only.split(",")
    results = {}
    if {"train_jax", "train_torch"} & set(wanted):
        results.update(train_both(args))
    for part in wanted:
        if part not in results:
            print(f"{part} ...", flush=True)
            results[part] = child(args, part)
    report = write_report(args, results, started)
    print_table(report)
    return 0 if not any("error" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
