"""How much `model.logits_dtype: bfloat16` (K2's bf16 output layer) moves the loss.

For each model the forward runs once; the fp32 logits give the loss as k2jax computed it before
(`logits_dtype: float32`), the same logits rounded to bf16 (model/transformer.py
`rounded_logits`, what the model returns under `logits_dtype: bfloat16`) give K2's. Printed per
model: mean |per-token loss difference| and the batch-mean loss difference.

  python benchmarks/logits_dtype_shift.py                   # both models, ~2 min on 2 cores
  python benchmarks/logits_dtype_shift.py --only tiny

Models: the converted tiny model of the conversion tests (tests/convert_fixtures.py: a random
transformers Llama, converted through the name map), and a K2-shaped random model: K2's width,
heads, vocabulary and Megatron initialisation (configs/k2-65b.yaml) with --k2-layers layers
(default 1, to fit a CPU's memory), on uniformly random token rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def token_losses(logits, tokens):
    from k2jax.model.loss import next_token_labels, token_losses as losses

    return np.asarray(losses(logits.astype(jnp.float32), next_token_labels(tokens)))[:, :-1]


def shift(params, config, tokens) -> dict:
    from k2jax.model import K2Model
    from k2jax.model.transformer import rounded_logits

    logits = jax.jit(lambda p, t: K2Model(config).apply({"params": p}, t))(params, tokens)
    exact = token_losses(logits, tokens).astype(np.float64)
    rounded = token_losses(rounded_logits(logits, "bfloat16"), tokens).astype(np.float64)
    diff = rounded - exact
    return {"tokens": diff.size, "loss fp32": exact.mean(), "mean |token diff|":
            np.abs(diff).mean(), "batch-mean diff": diff.mean(),
            "max |logit|": float(jnp.max(jnp.abs(logits)))}


def tiny(rows: int, seq: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from convert_fixtures import tiny_hf_model
    from hf_models import state_dict_numpy
    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    model = tiny_hf_model(max_positions=seq)
    config = model_config_from_hf(model.config.to_dict(), param_dtype="float32",
                                  compute_dtype="float32", remat="none", attention="xla")
    params = params_from_hf(state_dict_numpy(model).__getitem__, config)
    tokens = jax.random.randint(jax.random.key(1), (rows, seq), 0, config.vocab_size)
    return shift(params, config, tokens)


def k2_shaped(rows: int, seq: int, layers: int) -> dict:
    from k2jax.config import load_config
    from k2jax.model import K2Model

    config = dataclasses.replace(load_config("k2-65b").model, num_layers=layers,
                                 param_dtype="bfloat16", compute_dtype="bfloat16",
                                 logits_dtype="float32", remat="none", attention="xla")
    tokens = jax.random.randint(jax.random.key(1), (rows, seq), 0, config.vocab_size)
    params = jax.jit(lambda: K2Model(config).init(jax.random.key(0), tokens[:1, :8]))()["params"]
    return shift(params, config, tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("tiny", "k2"))
    parser.add_argument("--k2-layers", type=int, default=1)
    parser.add_argument("--k2-rows", type=int, default=2)
    parser.add_argument("--k2-seq", type=int, default=512)
    args = parser.parse_args()
    runs = []
    if args.only in (None, "tiny"):
        runs.append(("converted tiny (64 wide, 2 layers, vocab 250), 16 x 64 tokens",
                     lambda: tiny(16, 64)))
    if args.only in (None, "k2"):
        runs.append((f"K2-shaped random ({args.k2_layers} layer(s) at K2's width and vocab, "
                     f"bf16), {args.k2_rows} x {args.k2_seq} tokens",
                     lambda: k2_shaped(args.k2_rows, args.k2_seq, args.k2_layers)))
    print(f"{'model':<72}{'loss fp32':>10}{'mean |tok d|':>14}{'batch-mean d':>14}"
          f"{'max |logit|':>12}{'s':>6}")
    for name, fn in runs:
        t0 = time.perf_counter()
        r = fn()
        print(f"{name:<72}{r['loss fp32']:>10.4f}{r['mean |token diff|']:>14.3e}"
              f"{r['batch-mean diff']:>14.3e}{r['max |logit|']:>12.2f}"
              f"{time.perf_counter() - t0:>6.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
