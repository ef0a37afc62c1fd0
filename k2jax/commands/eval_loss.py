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

from k2jax import dtypes
from k2jax.errors import ConfigError, UserError
from k2jax.commands.cli_args import (STEP_LOSS_ALIASES, add_command, add_config_args,
                                     add_progress_flags, add_rope_freq_dtype_arg,
                                     add_run_dir_arg, add_weights_args, dtype_metavar,
                                     dtype_type, stderr_log, step_data_config)
from k2jax.data.loader import StepLoader

EVAL_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "eval-loss", "K2's loss of given weights on the rows of given steps "
        "(no update)", "k2jax eval-loss --hf K2-ckpt_100 --data k2data --steps 94100,94101:94105 "
        "--json", description=__doc__)
    add_weights_args(p, required=False)
    add_run_dir_arg(p, "; without --hf/--checkpoint the weights are its latest checkpoint")
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
    add_rope_freq_dtype_arg(p, None, "the config's model.rope_freq_dtype, the training run whose "
                            "loss this reproduces; K2's preset: bfloat16")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="mesh 'tensor' axis size; the other devices shard params (fsdp)")
    p.add_argument("--attention", default="auto",
                   choices=("auto", "xla", "pallas", "splash", "cudnn"),
                   help="attention implementation (auto: splash on TPU, cuDNN on a GPU, XLA "
                        "elsewhere)")
    p.add_argument("--json", action="store_true", help="one JSON object per step on stdout")
    add_progress_flags(p)
    p.set_defaults(func=run, flag_words={"micro_batch": "--micro-batch"})


def _weights_and_config(args: argparse.Namespace):
    """(opened weights, Config whose model is theirs set up for the loss) checked before any
    device: the weights are --hf/--checkpoint, or the --run-dir's latest checkpoint."""
    from k2jax.weights import open_weights

    if args.hf is None and args.checkpoint is None:
        if args.run_dir is None:
            raise UserError("give --hf DIR, --checkpoint DIR or --run-dir RUN")
        args.checkpoint = args.run_dir  # resolves to its latest complete checkpoint
    weights = open_weights(args.hf, args.checkpoint, stderr_log)
    config, moved = step_data_config(args, STEP_LOSS_ALIASES, computes_loss=True)
    # The loss reproduced is the config's training loss: its RoPE frequencies and logits
    # dtype, whatever the weights were stored with (config.json has neither).
    args.rope_freq_dtype = args.rope_freq_dtype or config.model.rope_freq_dtype
    config.model = weights.for_inference(args.dtype, args.attention, args.rope_freq_dtype,
                                         logits_dtype=config.model.logits_dtype)
    if config.data.seq_len > config.model.max_position_embeddings:
        raise ConfigError("data.seq_len", f"{config.data.seq_len} exceeds the weights' context "
                          f"(max_position_embeddings={config.model.max_position_embeddings})")
    return weights, config, moved


def run(args: argparse.Namespace) -> int:
    from k2jax.commands.step_spec import parse_steps

    # Everything a user can get wrong is checked before any device or weight is touched.
    steps = parse_steps(args.steps)
    weights, config, step_moved = _weights_and_config(args)
    model_config = config.model
    loader = StepLoader.from_config(config, moved_row_ranges=step_moved)
    for step in steps:
        loader.global_rows(step)  # a step past the data fails now, not after loading 65B
    if loader.documents is not None:  # packed rows: their segment ids must be there too
        loader.documents.read(loader.global_rows(steps[0])[:1])

    from k2jax import distributed

    distributed.initialize()
    import jax

    from k2jax.config import MeshConfig
    from k2jax.eval.loss_evaluator import LossEvaluator
    from k2jax.sharding.mesh import build_mesh
    from k2jax.sharding.padding import data_parallel_size, eval_plan
    from k2jax.sharding.rules import batch_sharding
    from k2jax.train.step_loss import StepLoss

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
        f", {args.dtype}, RoPE frequencies {args.rope_freq_dtype}, logits "
        f"{model_config.logits_dtype}")
    t0 = time.perf_counter()
    per_tensor = None if args.progress == "none" else log  # --quiet: no line per tensor
    params = weights.on_mesh(model_config, mesh, rules, per_tensor)
    log(f"weights on devices in {time.perf_counter() - t0:.1f} s")
    evaluate = LossEvaluator(params, StepLoss(
        model_config, mesh, rules, plan.rows, plan.accumulation,
        config.train.loss_normalization, config.train.loss_group_rows), config.data)

    from k2jax.progress import Progress

    # Lines mode: the per-step log line below is the progress (no timed lines besides).
    bar = Progress("eval-loss", len(steps), unit="step", every_s=None,
                   progress=args.progress if primary else "none")
    for step in steps:
        t0 = time.perf_counter()
        result = evaluate(loader.device_batch(step))
        record = {"step": step, "iteration": step + 1, "loss": result["loss"],
                  "tokens": result["tokens"], "rows": plan.rows,
                  "loss_sum": result["loss_sum"], "dtype": args.dtype,
                  "rope_freq_dtype": args.rope_freq_dtype,
                  "loss_normalization": config.train.loss_normalization,
                  "logits_dtype": model_config.logits_dtype,
                  "seconds": round(time.perf_counter() - t0, 3)}
        if primary:
            if args.json:
                print(json.dumps(record), flush=True)
            else:
                print(f"step {step} (logged as iteration {step + 1}): loss {record['loss']:.6f} "
                      f"over {record['tokens']} tokens", flush=True)
        bar.set_postfix_str(f"step {step} loss {record['loss']:.4f}")
        bar.update(1)
        if bar.mode == "lines":
            log(f"step {step}: loss {record['loss']:.6f} ({record['seconds']:.1f} s)")
    bar.close()
    return 0

