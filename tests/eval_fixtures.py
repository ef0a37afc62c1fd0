"""Shared fixtures for the eval/compare tests: a tiny random HF Llama saved with
save_pretrained (safetensors), its k2jax Orbax weights, and K2-format chunks of random ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hf_models import state_dict_numpy, tiny_llama

VOCAB = 250
SEQ = 16
GLOBAL_BATCH = 4
LINES = {0: 5, 1: 6}  # chunk id -> rows; order "0,1": step 1 (rows 4..7) straddles both files
MASKED_LINES = {1: (2,)}  # chunk 1 line 2 carries a tgt_mask


def write_chunks(directory: Path) -> None:
    rng = np.random.default_rng(11)
    for chunk_id, count in LINES.items():
        with open(directory / f"chunk_{chunk_id}.jsonl", "w") as f:
            for line in range(count):
                obj = {"token_ids": rng.integers(0, VOCAB, SEQ).tolist(), "source": "test",
                       "subset_name": "s", "src_filename": "f", "line_idx_in_src": line}
                if line in MASKED_LINES.get(chunk_id, ()):
                    obj["tgt_mask"] = [int(j % 3 != 0) for j in range(SEQ)]
                f.write(json.dumps(obj) + "\n")


def save_params(directory: Path, params, model_config) -> None:
    """A k2jax weights directory from an in-memory params tree (the layout `k2jax convert
    hf-to-orbax` streams to disk), for tests that need weights other than a conversion's."""
    import orbax.checkpoint as ocp

    from k2jax.checkpoint.params_io import PARAMS_ITEM, write_model_config

    directory.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory.absolute() / PARAMS_ITEM, params)
    write_model_config(str(directory), model_config)


def build(tmp: Path) -> dict:
    from k2jax.cli import main
    from k2jax.hf.config_json import model_config_from_hf
    from k2jax.hf.name_map import params_from_hf

    model = tiny_llama(vocab_size=VOCAB, num_kv_heads=2)
    hf_dir, data_dir = tmp / "hf", tmp / "data"
    model.save_pretrained(hf_dir)
    data_dir.mkdir()
    write_chunks(data_dir)
    assert main(["data", "index", str(data_dir), "--quiet"]) == 0
    config = model_config_from_hf(model.config.to_dict(), param_dtype="float32",
                                  compute_dtype="float32", remat="none", attention="xla")
    weights = state_dict_numpy(model)
    params = params_from_hf(weights.__getitem__, config)
    save_params(tmp / "orbax", params, config)
    # The same weights with layer 1's MLP output projection perturbed.
    params["layers"]["mlp"]["down_proj"] = params["layers"]["mlp"]["down_proj"].copy()
    params["layers"]["mlp"]["down_proj"][1] += 0.05
    save_params(tmp / "perturbed", params, config)
    return {"model": model, "hf": hf_dir, "data": data_dir, "orbax": tmp / "orbax",
            "perturbed": tmp / "perturbed"}


def reference_rows(data_dir: Path, use_tgt_mask: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All rows of chunk 0 then chunk 1, read the obvious way: tokens [N, S] and K2's loss mask
    (position i weighs target i + 1 by tgt_mask[i + 1] if `use_tgt_mask`, else 1; the last
    position is 0)."""
    tokens, masks = [], []
    for chunk_id in LINES:
        for line in open(data_dir / f"chunk_{chunk_id}.jsonl"):
            obj = json.loads(line)
            tgt = obj.get("tgt_mask") if use_tgt_mask else None
            tokens.append(obj["token_ids"])
            masks.append([float(tgt[i + 1]) if tgt else 1.0 for i in range(SEQ - 1)] + [0.0])
    return np.asarray(tokens, np.int64), np.asarray(masks, np.float64)
