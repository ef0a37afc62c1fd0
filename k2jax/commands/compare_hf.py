"""`k2jax compare-hf`: the same rows through transformers (PyTorch, CPU, fp32, eager) and k2jax
(fp32), with max abs logit difference, mean KL, top-1 agreement and both losses.

Both stacks use the RoPE frequencies of --rope-freq-dtype: float32 (default) is transformers as
released; bfloat16 rounds transformers' `inv_freq` buffers too, checking k2jax's K2-as-trained
RoPE against an independent implementation of it.

Packed rows (data.reset_attention_mask / reset_position_ids, e.g. chat SFT data) run as
training runs them: k2jax with the rows' segment ids and positions, transformers one document
at a time with the same positions, and the outputs put back in the row.

Exit 0 if within --max-abs and --max-kl, 1 if not, 2 on bad input. Without --checkpoint the
k2jax weights are the --hf weights converted in memory (testing the name map and the model);
with it, a k2jax checkpoint is compared against the HF model (testing a conversion too).
`--per-layer` adds the hidden-state difference after every layer, to find where stacks part.
"""

from __future__ import annotations

import argparse
import json
import sys

from k2jax.commands.cli_args import (DATA_PATH, STEP_DATA_ALIASES, add_command, add_config_args,
                                     add_rope_freq_dtype_arg, add_run_dir_arg, dtype_metavar,
                                     dtype_type, stderr_log, step_data_config)
from k2jax import dtypes
from k2jax.errors import UserError
from k2jax.hf.config_json import ARCHITECTURE_FIELDS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "compare-hf", "k2jax vs transformers logits on the same rows (fp32, CPU)",
        "k2jax compare-hf --hf K2-ckpt_100 --checkpoint weights/ckpt_100 --data k2data "
        "--step 94100 --rows 2 --per-layer", description=__doc__)
    p.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="k2jax weights to compare: weights, checkpoint step or run directory "
                        "(default: --hf converted in memory)")
    add_run_dir_arg(p)
    add_config_args(p, STEP_DATA_ALIASES)
    p.add_argument("--step", type=int, help="with --data: take rows of this step")
    p.add_argument("--token-ids", metavar="FILE.npy", help="int array [rows, seq] or [seq]")
    p.add_argument("--rows", type=int, default=1, help="first N rows of the step or file")
    p.add_argument("--max-abs", type=float, default=1e-3, help="max abs logit difference")
    p.add_argument("--max-kl", type=float, default=1e-6, help="mean KL(transformers || k2jax)")
    add_rope_freq_dtype_arg(p, "float32", "transformers' own, what this compares against")
    allowed = (dtypes.FLOAT32, dtypes.BFLOAT16)
    p.add_argument("--logits-dtype", default="float32", metavar=dtype_metavar(allowed),
                   type=dtype_type(allowed, "--logits-dtype", full_name=True),
                   help="both stacks' logits rounded to this dtype (float32: transformers' "
                        "own; bfloat16: model.logits_dtype of K2 as trained)")
    p.add_argument("--per-layer", action="store_true", help="hidden-state differences per layer")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _rows(args, model_config):
    """tokens int32 [N, S], loss_mask float32 [N, S], the document fields of packed rows
    (segment_ids / positions, as training reads them) and a description."""
    import numpy as np

    from k2jax.data.source import shifted_loss_mask

    if args.rows <= 0:
        raise UserError(f"--rows must be positive, got {args.rows}")
    if args.token_ids:
        if getattr(args, DATA_PATH.dest, None) or args.step is not None or args.run_dir:
            raise UserError("give either --token-ids or --data/--run-dir with --step, not both")
        try:
            tokens = np.load(args.token_ids)
        except (OSError, ValueError) as err:
            raise UserError(f"--token-ids {args.token_ids}: cannot read .npy ({err})")
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu" or tokens.shape[1] < 2:
            raise UserError(f"--token-ids {args.token_ids}: expected integer ids [rows, seq >= "
                            f"2], got {tokens.dtype} {list(tokens.shape)}")
        tokens = tokens[:args.rows].astype(np.int32)
        if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
            raise UserError(f"--token-ids {args.token_ids}: ids must be in [0, "
                            f"{model_config.vocab_size})")
        return tokens, shifted_loss_mask(*tokens.shape), {}, f"{args.token_ids}"
    if args.step is None:
        raise UserError("give --data DIR (or --config, --run-dir) with --step T, or --token-ids "
                        "FILE.npy")
    if args.step < 0:
        raise UserError(f"--step must be >= 0, got {args.step}")
    from k2jax.data.loader import StepLoader

    config, moved = step_data_config(args, STEP_DATA_ALIASES, model=model_config)
    batches = StepLoader.from_config(config, moved_row_ranges=moved)
    rows = batches.global_rows(args.step)[:args.rows]
    tokens, loss_mask = batches.source.read_rows(rows)
    documents = batches.documents.batch_fields(rows, len(rows)) if batches.documents else {}
    where = batches.data.path if batches.data.source == "k2" else "synthetic data"
    return tokens, loss_mask, documents, f"step {args.step} of {where}"


def _k2jax_params(args, hf, per_layer: bool):
    """The k2jax side's (config, host params): --hf converted in memory, or --checkpoint."""
    from k2jax.weights import open_weights

    settings = dict(dtype="fp32", attention="xla", rope_freq_dtype=args.rope_freq_dtype,
                    logits_dtype=args.logits_dtype, scan_layers=not per_layer)
    if not args.checkpoint:
        config = hf.for_inference(**settings)
        return config, hf.on_host(config)
    weights = open_weights(checkpoint=args.checkpoint, log=stderr_log)
    for field in ARCHITECTURE_FIELDS:
        if getattr(weights.model_config, field) != getattr(hf.model_config, field):
            raise UserError(f"--checkpoint {args.checkpoint}: model {field} is "
                            f"{getattr(weights.model_config, field)} but --hf config.json has "
                            f"{getattr(hf.model_config, field)}")
    config = weights.for_inference(**settings)
    return config, weights.on_host(config)


def run(args: argparse.Namespace) -> int:
    from k2jax.weights import open_weights

    hf = open_weights(hf=args.hf)
    tokens, loss_mask, documents, where = _rows(args, hf.model_config)
    packed = f", {sorted(documents)} per document" if documents else ""
    stderr_log(f"compare-hf: {tokens.shape[0]} row(s) x {tokens.shape[1]} tokens from "
               f"{where}{packed}")

    config, params = _k2jax_params(args, hf, args.per_layer)
    from k2jax.eval.k2jax_forward import k2jax_forward

    stderr_log(f"compare-hf: k2jax forward (fp32, RoPE frequencies {args.rope_freq_dtype}, "
               f"logits {args.logits_dtype})")
    ours, our_states = k2jax_forward(params, config, tokens, hidden_states=args.per_layer,
                                     documents=documents)
    del params
    from k2jax.eval.hf_reference import hf_forward, load_hf_model
    from k2jax.eval.rope_frequencies import round_hf_rope_frequencies

    stderr_log("compare-hf: transformers forward (PyTorch, CPU, fp32, eager attention, RoPE "
               f"frequencies {args.rope_freq_dtype}"
               f"{', one document at a time' if 'segment_ids' in documents else ''})")
    reference = round_hf_rope_frequencies(load_hf_model(args.hf), args.rope_freq_dtype)
    theirs, their_states = hf_forward(reference, tokens, args.per_layer,
                                      documents.get("segment_ids"), documents.get("positions"))
    if args.logits_dtype != "float32":  # both stacks' logits rounded alike
        import ml_dtypes  # jax's own dependency: numpy's bfloat16

        theirs = theirs.astype(getattr(ml_dtypes, args.logits_dtype)).astype("float32")

    from k2jax.eval.logit_compare import compare_hidden_states, compare_logits

    result = compare_logits(theirs, ours, tokens, loss_mask)
    failures = []
    if not result["max_abs"] <= args.max_abs:  # `not <=` also catches NaN
        failures.append(f"max abs logit difference {result['max_abs']:.3g} exceeds --max-abs "
                        f"{args.max_abs:g}")
    if not result["mean_kl"] <= args.max_kl:
        failures.append(f"mean KL {result['mean_kl']:.3g} exceeds --max-kl {args.max_kl:g}")
    layers = compare_hidden_states(their_states, our_states) if args.per_layer else []
    report = {"rows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]), "source": where,
              "rope_freq_dtype": args.rope_freq_dtype, "logits_dtype": args.logits_dtype,
              "documents": sorted(documents),
              **result, "max_abs_threshold": args.max_abs, "max_kl_threshold": args.max_kl,
              "passed": not failures, "per_layer": layers,
              # The first stage past --max-abs: where the two stacks part.
              "parts_at": next((r["name"] for r in layers if not r["max_abs"] <= args.max_abs),
                               None)}
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    if failures:
        print(f"k2jax compare-hf: FAILED: {'; '.join(failures)}", file=sys.stderr)
        if args.checkpoint:
            _explain_low_precision(args.checkpoint, args.max_abs)
        return 1
    return 0


def _explain_low_precision(checkpoint: str, max_abs: float) -> None:
    """A bf16/fp16 --checkpoint cannot meet fp32 thresholds: say so, or the failure reads as a
    broken conversion (a tiny fp32 model converted with --dtype bf16 differs by 0.087)."""
    from k2jax.weights import open_weights

    dtype = open_weights(checkpoint=checkpoint, log=lambda _: None).model_config.param_dtype
    if dtype != "float32":
        print(f"k2jax compare-hf: --checkpoint {checkpoint} holds {dtype} weights, so its logits "
              f"differ from transformers' fp32 ones by {dtype}'s rounding of every weight "
              f"(far past --max-abs {max_abs:g}: 0.087 for a tiny random fp32 model): compare an "
              "fp32 conversion (convert hf-to-orbax --dtype fp32) or raise --max-abs/--max-kl",
              file=sys.stderr)


def _table(report: dict) -> str:
    lines = [
        f"max |logit difference|  {report['max_abs']:.3e}  (--max-abs {report['max_abs_threshold']:g})",
        f"mean KL(hf || k2jax)    {report['mean_kl']:.3e}  (--max-kl {report['max_kl_threshold']:g})",
        f"top-1 agreement         {100 * report['top1_agreement']:.2f} % of "
        f"{report['positions']} positions",
        f"loss transformers       {report['loss_reference']:.6f}  ({report['tokens']} tokens)",
        f"loss k2jax              {report['loss_candidate']:.6f}",
        f"RoPE frequencies        {report['rope_freq_dtype']} (both stacks)",
    ]
    if report["per_layer"]:
        lines.append("hidden states (max abs, relative to max |hf|):")
        lines += [f"  {row['name']:<28} {row['max_abs']:.3e}  {row['relative']:.3e}"
                  for row in report["per_layer"]]
        lines.append(f"stacks part at: {report['parts_at'] or 'nowhere (all within --max-abs)'}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
