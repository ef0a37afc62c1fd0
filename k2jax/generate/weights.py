"""Weights for generation and scoring: a k2jax checkpoint or a Hugging Face directory, put on a
mesh built from `mesh.*` settings (the training rules shard the parameters)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from k2jax.config import MeshConfig, ModelConfig
from k2jax.errors import UserError


@dataclasses.dataclass
class LoadedModel:
    params: Any
    config: ModelConfig
    mesh: Any
    rules: dict


def model_config_of(checkpoint: Optional[str], hf: Optional[str], dtype: str,
                    attention: str = "auto") -> tuple[ModelConfig, Any]:
    """The weights' architecture set up for inference (and the open HF directory, if any),
    before any device is touched, so that bad input fails fast."""
    from k2jax.eval.weights import checkpoint_model_config, eval_model_config, hf_model_config

    if (checkpoint is None) == (hf is None):
        raise UserError("give one of checkpoint=DIR or hf=DIR")
    if hf is not None:
        from k2jax.eval.hf_weights import HFWeights

        source = HFWeights(hf)
        base = hf_model_config(source.config)
    else:
        source, base = None, checkpoint_model_config(checkpoint)
    # Released K2 weights are run as transformers runs them: fp32 RoPE frequencies.
    return eval_model_config(base, dtype, scan_layers=True, attention=attention), source


def load_model(checkpoint: Optional[str], hf: Optional[str], dtype: str = "fp32",
               mesh_config: Optional[MeshConfig] = None, attention: str = "auto",
               log=None) -> LoadedModel:
    config, source = model_config_of(checkpoint, hf, dtype, attention)
    from k2jax.eval.weights import params_from_checkpoint_on_mesh, params_from_hf_on_mesh
    from k2jax.sharding.mesh import build_mesh

    mesh_config = mesh_config or MeshConfig()
    mesh = build_mesh(mesh_config)
    rules = mesh_config.rules
    if source is not None:
        params = params_from_hf_on_mesh(source.get, config, mesh, rules, log)
    else:
        params = params_from_checkpoint_on_mesh(checkpoint, config, mesh, rules)
    return LoadedModel(params, config, mesh, rules)
