"""The data arguments shared by eval-loss and compare-hf, and the StepBatches they select.

Same meaning as `k2jax data batch`: step t = global rows [start_row + t * B, start_row +
(t + 1) * B) of the chunk files in `--order`.
"""

from __future__ import annotations

import argparse

from k2jax.config import Config, DataConfig, ModelConfig
from k2jax.errors import UserError


def add_data_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("--data", required=data_required, metavar="DIR",
                   help="directory of chunk_{i}.jsonl (indexed with `k2jax data index`) or "
                        "their packed form")
    p.add_argument("--global-batch", type=int, default=2040, help="rows per step (K2: 2040)")
    p.add_argument("--order", default="k2-stage1",
                   help="k2-stage1, k2-stage2, sequential, or comma-separated chunk ids (a prefix "
                        "of k2-stage1's list gives the same rows with fewer files)")
    p.add_argument("--format", default="auto", choices=("auto", "jsonl", "packed"))
    p.add_argument("--index-dir", default=None, metavar="DIR")
    p.add_argument("--start-row", type=int, default=0, help="global row of step 0")
    p.add_argument("--seq-len", type=int, default=2048)
    add_use_tgt_mask_arg(p)


def add_use_tgt_mask_arg(p: argparse.ArgumentParser) -> None:
    """--use-tgt-mask / --no-use-tgt-mask = data.use_tgt_mask, default K2 stage 1's (off)."""
    p.add_argument("--use-tgt-mask", action=argparse.BooleanOptionalAction,
                   default=DataConfig.use_tgt_mask,
                   help="apply rows' tgt_mask (data.use_tgt_mask; default off: K2's stage-1 "
                        "training code never read it)")


def parse_order(text: str):
    """A preset name, or comma-separated chunk ids -> list[int]."""
    if text[:1].isdigit():
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--order {text!r}: expected a preset or comma-separated chunk ids")
    return text


def step_batches(args: argparse.Namespace, model_config: ModelConfig):
    """StepBatches over the chunk files named by the args (validated, one clear error line)."""
    from k2jax.data.pipeline import make_step_batches

    if args.global_batch <= 0:
        raise UserError(f"--global-batch must be positive, got {args.global_batch}")
    data = DataConfig(source="k2", path=args.data, order=parse_order(args.order),
                      format=args.format, index_dir=args.index_dir, seq_len=args.seq_len,
                      global_batch_size=args.global_batch, micro_batch_size=args.global_batch,
                      start_row=args.start_row, use_tgt_mask=args.use_tgt_mask)
    return make_step_batches(Config(model=model_config, data=data).validate())
