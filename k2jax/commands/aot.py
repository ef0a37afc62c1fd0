"""`k2jax aot --config FILE --topology NAME [key=value ...]`: compile the train step for a TPU
slice ahead of time (libtpu, no TPU needed) and report whether it fits and how fast it may be."""

from __future__ import annotations

import argparse
import json

from k2jax.commands.cli_args import HelpFormatter

TOPOLOGY_HELP = (
    "TPU slice in Google's naming: v4-N and v5p-N count TensorCores (2 per chip: v5p-512 is "
    "256 chips, topology v5p:4x8x8; v4-1024 is 512 chips, v4:8x8x8); v5e-N and v6e-N count "
    "chips (v5e-256 is v5e:16x16); tpu7x-N (Ironwood) counts TensorCores, which there are the "
    "JAX devices, 2 per chip (tpu7x-8 is 4 chips, tpu7x:2x2x1, 8 devices; per-chip figures are "
    "then per device). A topology string such as v5p:4x8x8 is also accepted.")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "aot", help="compile the train step for a TPU slice ahead of time; per-chip memory, "
                    "fit, FLOPs, estimated MFU and predicted step time",
        description="Compile the complete train step (forward, backward, accumulation, AdamW) "
                    "for a TPU topology with libtpu, without a TPU, and report per chip the "
                    "bytes of parameters, optimizer state and temporaries against HBM (v4 32 "
                    "GiB, v5e 16, v5p 95, v6e 32), compiler FLOPs per step, and the step-time "
                    "model's predicted step (compute, HBM-bound and exposed collective "
                    "seconds, from the compiled HLO; docs/performance.md) and MFU, with the "
                    "band the model's calibration against published MaxText runs puts around "
                    "them and the days and chip-hours of the config's train.steps. Any dense "
                    "LLaMA-shaped config works, data.per_device_batch_size included (made rows "
                    "for the slice's devices): docs/maxtext.md. " + TOPOLOGY_HELP + " Example: "
                    "k2jax aot --config configs/k2-65b.yaml --topology v5p-512",
        epilog="example:\n  k2jax aot --config configs/k2-65b.yaml --topology v5p-512 --json\n"
               "  k2jax aot --config configs/examples/llama3.1-8b-v6e-256.yaml --topology "
               "v6e-256 --json\n"
               "  k2jax aot --config configs/k2-65b.yaml --topology v5e-256 --search "
               "--time-budget 3600",
        formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, metavar="FILE|PRESET",
                        help="YAML config (see configs/) or preset name")
    parser.add_argument("--topology", required=True, help=TOPOLOGY_HELP)
    parser.add_argument("--slices", type=int, default=1,
                        help="number of slices (multi-slice over DCN; set mesh.dcn_* to match)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-flops", action="store_true",
                        help="skip the two small extra compiles that measure step FLOPs")
    parser.add_argument("--hlo-out", metavar="FILE",
                        help="write the compiled step's optimized HLO text here (atomically), "
                             "e.g. to check the dtype of every collective")
    parser.add_argument("--search", action="store_true",
                        help="compile the sensible plans (tensor x fsdp split, micro-batch "
                             "count, remat policy, attention kernel) nearest the config first, "
                             "within --time-budget, and print them ranked by predicted step "
                             "time with their memory")
    parser.add_argument("--time-budget", type=float, default=1800.0, metavar="SECONDS",
                        help="--search: start no new compile after this many seconds")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. mesh.tensor=4 model.remat=save_qkv_out")
    parser.set_defaults(flag_words={"topology": "--topology"})
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from k2jax.aot.topology import parse_slice
    from k2jax.config import load_config
    from k2jax.errors import UserError

    # data.per_device_batch_size is made rows once the slice's devices are known.
    config = load_config(args.config, args.overrides, per_device_batch=True)
    tpu_slice = parse_slice(args.topology)
    if args.slices < 1:
        raise UserError(f"--slices: must be >= 1, got {args.slices}")
    if args.hlo_out is not None:
        from etils import epath

        if "://" not in args.hlo_out and not epath.Path(args.hlo_out).parent.is_dir():  # gs://
            raise UserError(f"--hlo-out {args.hlo_out}: its directory does not exist")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("AOT TPU compiles need libtpu: pip install 'k2jax[tpu]'") from None
    from k2jax.aot.compile_report import compile_report, format_report
    from k2jax.progress import elapsed_ticker

    if getattr(args, "search", False):
        return _search(args, tpu_slice)
    with elapsed_ticker(f"aot: lowering and compiling the train step for {args.topology} "
                        f"x {args.slices} slice(s) with libtpu (minutes for a large model)"):
        report = compile_report(config, tpu_slice, args.slices, measure_flops=not args.no_flops,
                                hlo_out=args.hlo_out)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def _search(args: argparse.Namespace, tpu_slice) -> int:
    import sys

    from k2jax.aot.compile_report import compile_report
    from k2jax.aot.plan_search import format_ranking, search
    from k2jax.progress import elapsed_ticker
    from k2jax.errors import UserError

    if args.time_budget <= 0:
        raise UserError(f"--time-budget: must be > 0 seconds, got {args.time_budget}")
    if args.hlo_out is not None:
        raise UserError("--hlo-out: not with --search (one HLO per plan); rerun the chosen plan")

    def compile_one(variant):
        with elapsed_ticker("aot: compiling this plan"):
            return compile_report(variant, tpu_slice, args.slices, measure_flops=False)

    reports = search(args.config, list(args.overrides), tpu_slice, args.slices, args.time_budget,
                     compile_one, log=lambda line: print(f"aot --search: {line}", file=sys.stderr))
    print(json.dumps({"plans": reports}) if args.json else format_ranking(reports))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m k2jax.commands.aot ...`: the same command without the CLI registry."""
    import sys

    from k2jax.errors import UserError

    parser = argparse.ArgumentParser(prog="k2jax")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["aot", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except UserError as err:
        print(f"k2jax aot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
