"""`k2jax compare-curves`: a run's loss curve against a reference CSV exported from W&B, or
against another run (a run directory or .jsonl given as --reference).

--run is a run directory (its metrics.jsonl) or a JSON-lines file (e.g. eval-loss --json
output, whose `iteration` field is used). Steps are Megatron iterations (see docs/reproduce.md).
Prints mean and max abs difference on common steps and the steps that part by more than
--threshold; exits 1 if any does, 0 if none, 2 on bad input. --out writes an overlay PNG.
"""

from __future__ import annotations

import argparse
import json

from k2jax.commands.cli_args import add_command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "compare-curves",
        "a run's loss curve vs a W&B CSV export or another run (table + PNG)",
        "k2jax compare-curves --run runs/k2 --reference k2_wandb.csv --steps 94000:95000 "
        "--out curves.png", description=__doc__)
    p.add_argument("--run", required=True, metavar="RUN_DIR|FILE.jsonl",
                   help="a run directory (its metrics.jsonl) or a JSON-lines file (eval-loss "
                        "--json output)")
    p.add_argument("--reference", required=True, metavar="FILE.csv|RUN_DIR|FILE.jsonl",
                   help="a W&B CSV export, or another run as --run takes it")
    p.add_argument("--steps", metavar="A:B", help="half-open step range (either end optional)")
    p.add_argument("--threshold", type=float, default=0.05,
                   help="absolute loss difference that counts as parting")
    p.add_argument("--out", metavar="PLOT.png", help="write the overlay plot here")
    p.add_argument("--step-column", help="reference CSV step column (default: detected)")
    p.add_argument("--loss-column", help="reference CSV loss column (default: detected)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run, flag_words={
        "run": "--run", "reference": "--reference", "out": "--out",
        "step_column": "--step-column", "loss_column": "--loss-column"})


def run(args: argparse.Namespace) -> int:
    from k2jax.errors import UserError
    from k2jax.eval import curves
    from k2jax.commands.step_spec import parse_range

    if not args.threshold > 0:
        raise UserError(f"--threshold must be positive, got {args.threshold}")
    start, stop = parse_range(args.steps) if args.steps else (None, None)
    run_curve = curves.restrict(curves.read_run(args.run), start, stop)
    reference = curves.restrict(_read_reference(args), start, stop)
    summary = curves.differences(run_curve, reference, args.threshold)
    if args.out:
        curves.plot_curves(run_curve, reference, args.out, args.threshold)
    if args.json:
        print(json.dumps({"run": run_curve.name, "reference": reference.name, **summary,
                          "plot": args.out}))
    else:
        print(_table(run_curve.name, reference.name, summary, args.out))
    return 1 if summary["parted"] else 0


def _read_reference(args: argparse.Namespace):
    """A W&B CSV, or a run (a directory or .jsonl file) read as --run is: two runs of one's own
    compare the same way as a run and K2's log."""
    from pathlib import Path

    from k2jax.errors import UserError
    from k2jax.eval import curves
    from k2jax.run_dir import METRICS_FILE

    path = Path(args.reference)
    if path.is_dir() and not (path / METRICS_FILE).is_file():
        raise UserError(f"--reference {path}: a directory without metrics.jsonl (expected a W&B "
                        "CSV export, a run directory or a .jsonl file)")
    if path.suffix == ".jsonl" and not path.is_file():
        raise UserError(f"--reference {path}: no such file")
    if path.is_dir() or path.suffix == ".jsonl":
        return curves.read_run(args.reference)
    return curves.read_reference_csv(args.reference, args.step_column, args.loss_column)


def _table(run_name: str, reference_name: str, s: dict, out) -> str:
    lines = [f"run:       {run_name}", f"reference: {reference_name}",
             f"common steps       {s['common_steps']}",
             f"mean |difference|  {s['mean_abs_diff']:.6f}  (mean run - reference "
             f"{s['mean_diff']:+.6f})",
             f"max |difference|   {s['max_abs_diff']:.6f}  at step {s['max_abs_diff_step']}",
             f"parted by > {s['threshold']:g}: {len(s['parted'])} step(s)"]
    if s["parted"]:
        lines.append(f"  {'step':>10} {'run':>10} {'reference':>10} {'diff':>10}")
        for p in s["parted"][:20]:
            lines.append(f"  {p['step']:>10} {p['run']:>10.5f} {p['reference']:>10.5f} "
                         f"{p['diff']:>+10.5f}")
        if len(s["parted"]) > 20:
            lines.append(f"  ... and {len(s['parted']) - 20} more (--json lists all)")
    if out:
        lines.append(f"plot: {out}")
    return "\n".join(lines)
