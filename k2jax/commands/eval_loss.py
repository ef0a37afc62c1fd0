"""`k2jax eval-loss`: K2's masked training loss of given weights on the exact rows of steps.

Nothing is updated. Step t is the 0-based batch index: global rows [t * B, (t + 1) * B) of the
order. Weights restored from `ckpt_k` (end of iteration 941 * k) see first the rows of step
941 * k; Megatron logged the loss of step t at iteration t + 1, which each JSON line also
reports as `iteration` (and which is also the step that `k2jax train` writes to metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from k2jax import dtypes
from k2jax.errors import UserError
from k2jax.commands.cli_args import (STEP_LOSS_ALIASES, add_command, add_config_args,
                                     add_progress_flags, add_rope_freq_dtype_arg,
                                     add_weights_args, dtype_metavar, dtype_type,
                                     k2_data_config)
from k2jax.data.loader import StepLoader

EVAL_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "eval-loss", "K2's loss of given weights on the rows of given steps "
        "(no update)", "k2jax eval-loss --hf K2-ckpt_100 --data k2data --steps 94100,94101:94105 "
        "--json", description=__doc__)
    add_weights_args(p)
    p.add_argument("--steps", required=True, metavar="SPEC",
                   help="steps, e.g. 94100,94101:94105 (A:B is half-open: A..B-1)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="rows per micro-step over the whole mesh (unset: 4 per data-parallel "
                        "device; a memory choice of this command, not data.micro_batch_size); "
                        "the batch is padded with masked rows to a multiple of N")
    add_config_args(p, STEP_LOSS_ALIASES)
    p.add_argument("--dtype", default="fp32", type=dtype_type(EVAL_DTYPES),
                   metavar=dtype_metavar(EVAL_DTYPES),
                   help="parameter and compute dtype (K2 trained with bf16 compute)")
    add_rope_freq_dtype_arg(p, "bfloat16", "K2's training run, whose logged loss this reproduces")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="mesh 'tensor' axis size; the other devices shard params (fsdp)")
    p.add_argument("--attention", default="auto",
                   choices=("auto", "xla", "pallas", "splash", "cudnn"),
                   help="attention implementation (auto: splash on TPU, cuDNN on a GPU, XLA "
                        "elsewhere)")
    p.add_argument("--json", action="store_true", help="one JSON object per step on stdout")
    add_progress_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2jax.commands.step_spec import parse_steps
    from k2jax.eval.weights import (checkpoint_model_config, eval_model_config, hf_model_config,
                                    stderr_log)

    # Everything a user can get wrong is checked before any device or weight is touched.
    steps = parse_steps(args.steps)
    if args.hf:
        from k2jax.eval.hf_weights import HFWeights

        hf = HFWeights(args.hf)
        base = hf_model_config(hf.config)
    else:
        base = checkpoint_model_config(args.checkpoint)
    model_config = eval_model_config(base, args.dtype, scan_layers=True, attention=args.attention,
                                     rope_freq_dtype=args.rope_freq_dtype)
    config = k2_data_config(args, STEP_LOSS_ALIASES, model=model_config, computes_loss=True)
    if config.data.uses_segments:  # the eval forward has no segment ids or positions
        raise UserError("eval-loss does not separate packed documents: set "
                        "data.reset_attention_mask=false and data.reset_position_ids=false "
                        "(the loss would mix documents that training kept apart)")
    loader = StepLoader.from_config(config)
    for step in steps:
        loader.global_rows(step)  # a step past the data fails now, not after loading 65B

    from k2jax import distributed

    distributed.initialize()
    import jax

    from k2jax.config import MeshConfig
    from k2jax.eval.batch_loss import BatchLossEvaluator
    from k2jax.eval.weights import params_from_checkpoint_on_mesh, params_from_hf_on_mesh
    from k2jax.sharding.mesh import build_mesh
    from k2jax.sharding.padding import data_parallel_size, eval_plan
    from k2jax.sharding.rules import batch_sharding

    primary = jax.process_index() == 0
    log = stderr_log if primary else (lambda _: None)
    mesh_config = MeshConfig(tensor=args.tensor_parallel)
    mesh = build_mesh(mesh_config)
    rules = mesh_config.rules
    plan = eval_plan(config.data.global_batch_size, args.micro_batch,
                     data_parallel_size(mesh, rules), jax.process_count())
    loader = loader.on_devices(plan, batch_sharding(mesh, rules))
    log(f"eval-loss: {len(steps)} step(s), {jax.device_count()} devices "
        f"(mesh {dict(mesh.shape)}), micro-batch {plan.micro_rows} x {plan.accumulation}"
        f"{f' (padded {plan.rows} -> {plan.padded_rows} rows)' if plan.padding_rows else ''}"
        f", {args.dtype}, RoPE frequencies {args.rope_freq_dtype}")
    t0 = time.perf_counter()
    if args.hf:
        params = params_from_hf_on_mesh(hf.get, model_config, mesh, rules, log)
    else:
        params = params_from_checkpoint_on_mesh(args.checkpoint, model_config, mesh, rules)
    log(f"weights on devices in {time.perf_counter() - t0:.1f} s")
    evaluate = BatchLossEvaluator(params, model_config, mesh, rules, plan,
                                  config.train.loss_normalization, config.train.loss_group_rows)

    from tqdm import tqdm

    bar = tqdm(steps, desc="eval-loss", unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress or not primary)
    for step in bar:
        t0 = time.perf_counter()
        result = evaluate(loader.device_batch(step))
        record = {"step": step, "iteration": step + 1, "loss": result["loss"],
                  "tokens": result["tokens"], "rows": plan.rows,
                  "loss_sum": result["loss_sum"], "dtype": args.dtype,
                  "rope_freq_dtype": args.rope_freq_dtype,
                  "loss_normalization": config.train.loss_normalization,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if primary:
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"step {step} (logged as iteration {step + 1}): loss {record['loss']:.6f} "
                      f"over {record['tokens']} tokens", flush=True)
        bar.set_postfix_str(f"step {step} loss {record['loss']:.4f}")
        if args.no_progress:
            log(f"step {step}: loss {record['loss']:.6f} ({record['seconds']:.1f} s)")
    bar.close()
    return 0

