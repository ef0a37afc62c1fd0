"""Checkpoint save/restore time on local disk beside gs:// (a local GCS protocol server), same run.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_io.py [--models tiny,100m] [--repeats 2]

Saves and restores a training checkpoint through k2jax's own RunCheckpoints (Orbax, the items a
trainer writes: state, config, data) whose state has a K2-architecture model's parameter shapes
(scanned layout) plus Adam's two moments, all float32, as a real TrainState does. gs:// is
fake-gcs-server on 127.0.0.1 (tests/gcs_server.py), reached through the standard TensorStore/
gcsfs hooks: loopback has no network limit, so the gs:// column is the request and encoding
cost of the GCS path, a floor for a real bucket, not a bucket's speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODELS = {  # name -> overrides of configs/tiny.yaml
    "tiny": [],
    "100m": ["model.hidden_size=640", "model.intermediate_size=1728", "model.num_layers=10",
             "model.num_heads=10", "model.num_kv_heads=10"],
}


def train_state(model_config) -> dict:
    """{step, params, opt_state: {mu, nu}} with the model's scanned parameter shapes, float32."""
    from k2jax.convert.orbax_writer import leaf_path, leaf_shape
    from k2jax.hf import name_map
    from k2jax.tree_paths import set_path

    rng = np.random.default_rng(0)
    params: dict = {}
    for mapping in name_map.mappings(model_config):
        shape = leaf_shape(mapping, model_config)
        set_path(params, leaf_path(mapping), rng.standard_normal(shape, np.float32))
    copy = lambda tree: {k: copy(v) if isinstance(v, dict) else v * 0.5  # noqa: E731
                         for k, v in tree.items()}
    return {"step": np.int64(7), "params": params,
            "opt_state": {"mu": copy(params), "nu": copy(params)}}


def time_save_restore(run_dir: str, config, state: dict) -> tuple[float, float]:
    import jax

    from k2jax.checkpoint.manager import RunCheckpoints

    checkpoints = RunCheckpoints(run_dir, config.train)
    start = time.perf_counter()
    checkpoints.save(7, state, {"model": {}}, {"step": 7})
    checkpoints.wait()
    save_s = time.perf_counter() - start
    checkpoints.close()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
                            state)
    checkpoints = RunCheckpoints(run_dir, config.train)
    start = time.perf_counter()
    restored = checkpoints.restore_state(7, abstract)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    checkpoints.close()
    first = next(iter(jax.tree.leaves(state["params"])))
    again = next(iter(jax.tree.leaves(restored["params"])))
    assert np.array_equal(np.asarray(first), np.asarray(again)), "restore changed the bytes"
    return save_s, restore_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many")
    args = parser.parse_args()

    from gcs_server import GCSServer, set_environment

    from k2jax.config import load_config

    scratch = Path(tempfile.mkdtemp(prefix="k2jax-bench-ckpt-"))
    server = GCSServer(scratch).start()
    set_environment(server.environment())
    rows = []
    try:
        for name in args.models.split(","):
            config = load_config(ROOT / "configs" / "tiny.yaml",
                                 MODELS[name] + ["train.async_checkpoint=false"])
            state = train_state(config.model)
            nbytes = sum(a.nbytes for a in _leaves(state))
            params = sum(a.size for a in _leaves(state["params"]))
            best = {}
            for repeat in range(args.repeats):
                for where in ("local", "gs"):
                    run_dir = (str(scratch / f"{name}-{repeat}") if where == "local"
                               else f"{server.bucket('ckpt')}/{name}")
                    save_s, restore_s = time_save_restore(run_dir, config, state)
                    old = best.get(where, (float("inf"), float("inf")))
                    best[where] = (min(old[0], save_s), min(old[1], restore_s))
            for i, what in enumerate(("save", "restore")):
                rows.append((f"{name} ({params / 1e6:,.1f}M params, {nbytes / 2**20:,.0f} MiB "
                             f"state) {what}", best["local"][i], best["gs"][i], nbytes))
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    load = os.getloadavg()
    print(f"# checkpoint I/O, {time.strftime('%Y-%m-%d')}, {platform.node()} "
          f"({os.cpu_count()} CPUs), load average {load[0]:.1f}, best of {args.repeats}")
    print("| checkpoint | local disk | gs:// (local server, loopback) |\n|---|---|---|")
    for label, local_s, gs_s, nbytes in rows:
        print(f"| {label} | {local_s:.2f} s ({nbytes / 2**20 / local_s:,.0f} MiB/s) | "
              f"{gs_s:.2f} s ({nbytes / 2**20 / gs_s:,.0f} MiB/s) |")


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield np.asarray(tree)


if __name__ == "__main__":
    main()
