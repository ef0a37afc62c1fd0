"""Weights for inference, opened once: `--hf DIR` or `--checkpoint DIR` -> the architecture
(no device touched) -> an inference model config -> the parameters on a mesh.

The inference counterpart of train/setup.py, after Levanter's HFCheckpointConverter (config
from a checkpoint without devices, then sharded weights): every bad input (a directory of
neither kind, a run without a complete checkpoint, a damaged config) fails in `open_weights`,
before any device or tensor is touched. A run directory given as the checkpoint resolves here,
once, to its latest complete step.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Optional

from k2jax import dtypes
from k2jax.checkpoint import params_io
from k2jax.config import MeshConfig, ModelConfig
from k2jax.errors import UserError
from k2jax.paths import storage_path
from k2jax.run_dir import CHECKPOINTS_DIR as RUN_CHECKPOINTS

INFERENCE_DTYPES = (dtypes.FLOAT32, dtypes.BFLOAT16)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class LoadedModel:
    """Parameters on a mesh and the config they run with."""

    params: Any
    config: ModelConfig
    mesh: Any
    rules: dict


@dataclasses.dataclass(frozen=True)
class InferenceWeights:
    """One opened weights directory. kind: 'hf' (a Hugging Face LlamaForCausalLM directory),
    'params' (a k2jax weights directory) or 'state' (a training checkpoint step)."""

    kind: str
    directory: str
    model_config: ModelConfig  # the architecture as stored with the weights
    hf: Any = None  # HFTensors for kind 'hf'

    def for_inference(self, dtype: str = "fp32", attention: str = "auto",
                      rope_freq_dtype: str = "float32", logits_dtype: Optional[str] = None,
                      scan_layers: bool = True) -> ModelConfig:
        """The architecture set up for a forward pass only: no remat; fp32 = fp32 params and
        compute, bf16 = bf16 params and compute (Megatron's bf16 forward). `rope_freq_dtype`
        replaces whatever the stored config says; `logits_dtype` too unless None. Dtypes in
        either spelling (bf16 or bfloat16)."""
        return inference_model_config(self.model_config, dtype, scan_layers, attention,
                                      rope_freq_dtype, logits_dtype)

    def on_mesh(self, config: ModelConfig, mesh, rules: dict,
                log: Optional[Callable[[str], None]] = None) -> Any:
        """The params tree of `config` (for_inference's) sharded on `mesh` by `rules`."""
        from k2jax.weights.on_mesh import params_from_checkpoint_on_mesh, params_from_hf_on_mesh

        if self.kind == "hf":
            return params_from_hf_on_mesh(self.hf.get, config, mesh, rules, log)
        return params_from_checkpoint_on_mesh(self.directory, config, mesh, rules)

    def on_host(self, config: ModelConfig) -> Any:
        """Host (numpy) params in `config`'s layout, scanned or per-layer: small-model checks."""
        from k2jax.weights.on_mesh import unstack_layers

        if self.kind == "hf":
            from k2jax.hf.name_map import params_from_hf

            return params_from_hf(self.hf.get, config)
        params = self.on_mesh(dataclasses.replace(config, scan_layers=True), *_one_mesh())
        return params if config.scan_layers else unstack_layers(params, config.num_layers)

    def load(self, config: ModelConfig, mesh_config: Optional[MeshConfig] = None,
             log: Optional[Callable[[str], None]] = None) -> LoadedModel:
        """`config`'s params on the mesh `mesh_config` builds over all devices."""
        from k2jax.sharding.mesh import build_mesh

        mesh_config = mesh_config or MeshConfig()
        mesh = build_mesh(mesh_config)
        params = self.on_mesh(config, mesh, mesh_config.rules, log)
        return LoadedModel(params, config, mesh, mesh_config.rules)


def _one_mesh():
    from k2jax.sharding.mesh import build_mesh

    mesh_config = MeshConfig()
    return build_mesh(mesh_config), mesh_config.rules


def inference_model_config(base: ModelConfig, dtype: str, scan_layers: bool = True,
                           attention: str = "auto", rope_freq_dtype: str = "float32",
                           logits_dtype: Optional[str] = None) -> ModelConfig:
    """InferenceWeights.for_inference on a given architecture."""
    name = dtypes.parse(dtype, "inference dtype", INFERENCE_DTYPES).name
    rope = dtypes.parse(rope_freq_dtype, "model.rope_freq_dtype", INFERENCE_DTYPES).name
    logits = (base.logits_dtype if logits_dtype is None else
              dtypes.parse(logits_dtype, "model.logits_dtype", INFERENCE_DTYPES).name)
    return dataclasses.replace(base, param_dtype=name, compute_dtype=name, remat="none",
                               scan_layers=scan_layers, attention=attention,
                               rope_freq_dtype=rope, logits_dtype=logits)


def resolve_checkpoint(directory: str, log: Callable[[str], None] = _stderr) -> str:
    """A weights or checkpoint step directory as given; a run directory (or its checkpoints/)
    -> its latest complete step, said in one line."""
    path = storage_path(directory)
    if (path / params_io.PARAMS_ITEM).exists() or (path / "state").exists():
        return directory
    folder = path / RUN_CHECKPOINTS if (path / RUN_CHECKPOINTS).is_dir() else path
    if not folder.is_dir():
        raise UserError(f"{directory}: not found")
    import orbax.checkpoint as ocp

    steps = sorted(ocp.path.step.checkpoint_steps(folder)) if folder.is_dir() else []
    if not steps:
        raise UserError(f"{directory}: not a k2jax weights directory (no params/), a training "
                        "checkpoint step directory (no state/), nor a run directory with a "
                        f"complete checkpoint ({RUN_CHECKPOINTS}/<step>)")
    chosen = f"{str(directory).rstrip('/')}/{RUN_CHECKPOINTS if folder != path else ''}"
    chosen = chosen.rstrip("/") + f"/{steps[-1]}"
    log(f"checkpoint: {directory} -> {chosen} (latest complete step of {len(steps)})")
    return chosen


def checkpoint_model_config(directory: str) -> ModelConfig:
    """The architecture stored with a k2jax weights or checkpoint step directory."""
    config = params_io.read_model_config(directory)
    if config is None:
        raise UserError(f"{directory}: no {params_io.MODEL_CONFIG_FILE} nor run "
                        "config next to the weights, so the architecture is unknown")
    return config


def open_weights(hf: Optional[str] = None, checkpoint: Optional[str] = None,
                 log: Callable[[str], None] = _stderr) -> InferenceWeights:
    """Exactly one of `hf` / `checkpoint`, opened and checked without touching a device."""
    if (checkpoint is None) == (hf is None):
        raise UserError("give one of hf (a Hugging Face directory) or checkpoint (a k2jax "
                        "weights, checkpoint step or run directory)")
    if hf is not None:
        from k2jax.hf.config_json import model_config_from_hf
        from k2jax.weights.hf_tensors import HFTensors

        tensors = HFTensors(hf)
        return InferenceWeights("hf", hf, model_config_from_hf(tensors.config), tensors)
    directory = resolve_checkpoint(checkpoint, log)
    kind = params_io.weights_kind(directory)  # a clear error for a directory of neither kind
    return InferenceWeights(kind, directory, checkpoint_model_config(directory))
