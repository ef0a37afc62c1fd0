"""`k2jax eval-loss`: K2's masked training loss of given weights on the exact rows of steps.

Nothing is updated. Step t is the 0-based batch index: global rows [t * B, (t + 1) * B) of the
order. Weights restored from `ckpt_k` (end of iteration 941 * k) see first the rows of step
941 * k; Megatron logged the loss of step t at iteration t + 1, which each JSON line also
reports as `iteration` (and which is also the step that `k2jax train` writes to metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time

from k2jax.eval.step_data import add_data_args, step_batches


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-loss", help="K2's loss of given weights on the rows of given steps (no update)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--hf", metavar="DIR", help="Hugging Face LlamaForCausalLM directory "
                         "(safetensors or .bin shards), converted in memory")
    weights.add_argument("--checkpoint", metavar="DIR", help="k2jax weights directory or "
                         "training checkpoint step directory")
    p.add_argument("--steps", required=True, metavar="SPEC",
                   help="steps, e.g. 94100,94101:94105 (A:B is half-open: A..B-1)")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="rows per micro-step over the whole mesh (default 4 per data-parallel "
                        "device); the batch is padded with masked rows to a multiple of N")
    add_data_args(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="parameter and compute dtype (K2 trained with bf16 compute)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="mesh 'tensor' axis size; the other devices shard params (fsdp)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "pallas"))
    p.add_argument("--loss-normalization", default="per_group", choices=("per_group", "global"),
                   help="per_group (K2's, what its W&B log shows): mean over groups of "
                        "--loss-group-rows consecutive rows of each group's masked mean; "
                        "global: sum(loss * mask) / sum(mask) over the batch")
    p.add_argument("--loss-group-rows", type=int, default=4, metavar="N",
                   help="rows per group for per_group (K2: 4, one rank's micro-batch)")
    p.add_argument("--json", action="store_true", help="one JSON object per step on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2jax.eval.step_spec import parse_steps
    from k2jax.eval.weights import (checkpoint_model_config, eval_model_config, hf_model_config,
                                    stderr_log)

    # Everything a user can get wrong is checked before any device or weight is touched.
    steps = parse_steps(args.steps)
    if args.loss_normalization == "per_group" and (
            args.loss_group_rows <= 0 or args.global_batch % args.loss_group_rows):
        from k2jax.errors import UserError

        raise UserError(f"--loss-group-rows {args.loss_group_rows}: must be positive and divide "
                        f"--global-batch {args.global_batch}")
    if args.hf:
        from k2jax.eval.hf_weights import HFWeights

        hf = HFWeights(args.hf)
        base = hf_model_config(hf.config)
    else:
        base = checkpoint_model_config(args.checkpoint)
    model_config = eval_model_config(base, args.dtype, scan_layers=True, attention=args.attention)
    batches = step_batches(args, model_config)
    for step in steps:
        batches.global_rows(step)  # a step past the data fails now, not after loading 65B

    from k2jax import distributed

    distributed.initialize()
    import jax

    from k2jax.config import MeshConfig
    from k2jax.eval.batch_loss import (BatchLossEvaluator, data_parallel_size,
                                       plan_micro_batches)
    from k2jax.eval.weights import params_from_checkpoint_on_mesh, params_from_hf_on_mesh
    from k2jax.sharding.mesh import build_mesh

    primary = jax.process_index() == 0
    log = stderr_log if primary else (lambda _: None)
    mesh_config = MeshConfig(tensor=args.tensor_parallel)
    mesh = build_mesh(mesh_config)
    rules = mesh_config.rules
    plan = plan_micro_batches(args.global_batch, args.micro_batch,
                              data_parallel_size(mesh, rules))
    log(f"eval-loss: {len(steps)} step(s), {jax.device_count()} devices "
        f"(mesh {dict(mesh.shape)}), micro-batch {plan.micro_batch} x {plan.accumulation}"
        f"{f' (padded {plan.global_batch} -> {plan.padded_rows} rows)' if plan.padded_rows != plan.global_batch else ''}"
        f", {args.dtype}")
    t0 = time.perf_counter()
    if args.hf:
        params = params_from_hf_on_mesh(hf.get, model_config, mesh, rules, log)
    else:
        params = params_from_checkpoint_on_mesh(args.checkpoint, model_config, mesh, rules)
    log(f"weights on devices in {time.perf_counter() - t0:.1f} s")
    evaluate = BatchLossEvaluator(params, model_config, mesh, rules, plan,
                                  args.loss_normalization, args.loss_group_rows)

    for step in steps:
        t0 = time.perf_counter()
        batch = batches.global_batch(step)
        result = evaluate(batch["tokens"], batch["loss_mask"])
        record = {"step": step, "iteration": step + 1, "loss": result["loss"],
                  "tokens": result["tokens"], "rows": plan.global_batch,
                  "loss_sum": result["loss_sum"], "dtype": args.dtype,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if primary:
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"step {step} (logged as iteration {step + 1}): loss {record['loss']:.6f} "
                      f"over {record['tokens']} tokens", flush=True)
        log(f"step {step}: loss {record['loss']:.6f} ({record['seconds']:.1f} s)")
    return 0

