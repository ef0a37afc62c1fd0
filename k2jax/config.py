"""Typed run configuration: YAML files in configs/ plus `section.key=value` overrides.

Every field has a type; loading checks names, types and cross-field consistency and raises
ConfigError naming the dotted key. The dataclasses are the single list of settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from k2jax.errors import ConfigError, UserError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_out")


@dataclasses.dataclass
class ModelConfig:
    """K2's architecture (Hugging Face LlamaForCausalLM fields) and how to compute it."""

    vocab_size: int = 32032
    hidden_size: int = 8192
    intermediate_size: int = 22016
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 64
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = 0
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    scan_layers: bool = True
    remat: str = "full"
    attention: Literal["auto", "xla", "pallas"] = "auto"
    attention_block_q: Optional[int] = None  # None: per-TPU-generation default
    attention_block_kv: Optional[int] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", f"must be positive, got {getattr(self, key)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("model.hidden_size", f"{self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model.num_kv_heads", f"{self.num_kv_heads} does not divide "
                              f"model.num_heads={self.num_heads}")
        if self.resolved_head_dim % 2:
            raise ConfigError("model.head_dim", "must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.initializer_range <= 0:
            raise ConfigError("model.rope_theta", "rope_theta, rms_norm_eps and "
                              "initializer_range must be positive")
        for key in ("param_dtype", "compute_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ConfigError(f"model.{key}", f"expected one of {DTYPES}, "
                                  f"got {getattr(self, key)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"expected one of {REMAT_POLICIES}, got {self.remat!r}")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW with K2's warm-up + cosine schedule (K2_SPEC section 3)."""

    peak_lr: float = 1.5e-4
    min_lr: float = 1.5e-5
    warmup_steps: int = 2000
    decay_steps: int = 338760  # the step at which the cosine reaches min_lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0

    def validate(self) -> None:
        if self.warmup_steps < 0 or self.decay_steps <= self.warmup_steps:
            raise ConfigError("optimizer.decay_steps", f"must exceed optimizer.warmup_steps "
                              f"({self.warmup_steps}), got {self.decay_steps}")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ConfigError("optimizer.min_lr", f"must be in [0, peak_lr={self.peak_lr}], "
                              f"got {self.min_lr}")


@dataclasses.dataclass
class DataConfig:
    """Where batches come from. `global_batch_size` rows of `seq_len` tokens per step."""

    source: Literal["synthetic", "k2"] = "synthetic"
    path: Optional[str] = None  # directory of chunk_{i}.jsonl (and its index / packed form)
    order: Union[str, list[int]] = "k2-stage1"  # preset name or explicit chunk id list
    format: Literal["auto", "jsonl", "packed"] = "auto"
    index_dir: Optional[str] = None  # line-offset index of jsonl chunks; None: <path>/.k2index
    seq_len: int = 2048
    global_batch_size: int = 2040
    micro_batch_size: int = 2040  # rows per accumulation micro-step, over the whole mesh
    start_row: int = 0  # global row offset added to step * global_batch_size
    # [start, count] global row windows moved to the end of the order, applied in turn
    # (what K2's team did by hand after a malignant loss spike; rollback appends here).
    moved_row_ranges: list[list[int]] = dataclasses.field(default_factory=list)
    worker_count: int = 0
    prefetch: int = 2
    # Fault injection for the synthetic source (tests of spike handling): [start, count] windows
    # of original rows replaced by uniform random tokens, or given a non-finite loss mask.
    synthetic_poison_rows: list[list[int]] = dataclasses.field(default_factory=list)
    synthetic_poison_kind: Literal["random", "nonfinite"] = "random"

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", f"must be at least 2, got {self.seq_len}")
        if self.global_batch_size <= 0 or self.micro_batch_size <= 0:
            raise ConfigError("data.global_batch_size", "batch sizes must be positive")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError("data.micro_batch_size", f"{self.micro_batch_size} does not divide "
                              f"data.global_batch_size={self.global_batch_size}")
        for i, window in enumerate(self.moved_row_ranges):
            if len(window) != 2 or window[0] < 0 or window[1] <= 0:
                raise ConfigError(f"data.moved_row_ranges[{i}]", f"expected [start >= 0, count > 0], "
                                  f"got {window}")
        if self.source == "k2" and not self.path:
            raise ConfigError("data.path", "required when data.source is 'k2'")
        if isinstance(self.order, list) and (not self.order or min(self.order) < 0):
            raise ConfigError("data.order", f"expected a preset name or a non-empty list of "
                              f"chunk ids >= 0, got {self.order}")
        if self.worker_count < 0 or self.prefetch < 0:
            raise ConfigError("data.worker_count", f"worker_count and prefetch must be >= 0, got "
                              f"{self.worker_count} and {self.prefetch}")


@dataclasses.dataclass
class SpikeConfig:
    """Loss-spike detection and the action taken (see k2jax/train/spikes.py)."""

    action: Literal["log", "skip", "rollback"] = "log"
    window: int = 100  # steps in the running median
    threshold: float = 3.0  # a spike is loss > threshold * running median
    min_history: int = 10  # steps observed before ratio spikes are detected

    def validate(self) -> None:
        if self.window < 1 or self.threshold <= 1.0:
            raise ConfigError("train.spikes.threshold", "window must be >= 1 and threshold > 1")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 338760
    run_dir: str = "runs/k2"
    seed: int = 22238
    checkpoint_every: int = 941
    keep_checkpoints: int = 3
    keep_period: Optional[int] = None  # also keep every Nth step permanently (K2: 941)
    async_checkpoint: bool = True
    resume_step: Optional[int] = None
    init_from: Optional[str] = None
    log_every: int = 1
    peak_flops_per_device: Optional[float] = None  # None: known value for the device kind
    spikes: SpikeConfig = dataclasses.field(default_factory=SpikeConfig)
    # dtype of weight gradients out of the matmuls and of their data-parallel reductions.
    # float32 is K2's (Megatron's fp32 main_grad and fp32 all-reduce) and the safer default:
    # bf16 keeps 8 mantissa bits, so a small per-row contribution summed over thousands of
    # rows is lost in rounding; float32 costs twice the reduce-scatter bytes.
    gradient_dtype: Literal["float32", "bfloat16"] = "float32"
    # global: sum(loss * mask) / sum(mask) over the global batch. per_group: K2's (Megatron's)
    # mean over consecutive groups of `loss_group_rows` rows of each group's masked mean.
    loss_normalization: Literal["global", "per_group"] = "global"
    loss_group_rows: int = 4  # K2: 4, one data-parallel rank's micro-batch

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("train.steps", f"must be >= 0, got {self.steps}")
        if self.checkpoint_every <= 0 or self.keep_checkpoints <= 0 or self.log_every <= 0:
            raise ConfigError("train.checkpoint_every", "checkpoint_every, keep_checkpoints "
                              "and log_every must be positive")
        if self.loss_group_rows <= 0:
            raise ConfigError("train.loss_group_rows", f"must be positive, got "
                              f"{self.loss_group_rows}")
        self.spikes.validate()


@dataclasses.dataclass
class MeshConfig:
    """Device mesh (per slice, ICI) and across slices (DCN); one -1 is filled from the devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # logical axis name -> mesh axis name(s); every parameter axis must be covered.
    rules: dict[str, Union[str, list[str], None]] = dataclasses.field(default_factory=lambda: {
        "batch": ["data", "fsdp"],
        "length": None,
        "vocab": "tensor",
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "head_dim": None,
        "mlp": "tensor",
        "layers": None,
        "norm": None,
    })

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("mesh", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}", f"must be positive or -1, got {size}")


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def validate(self) -> "Config":
        for section in (self.model, self.optimizer, self.data, self.train, self.mesh):
            section.validate()
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds "
                              f"model.max_position_embeddings={self.model.max_position_embeddings}")
        if (self.train.loss_normalization == "per_group"
                and self.data.global_batch_size % self.train.loss_group_rows):
            raise ConfigError("train.loss_group_rows", f"{self.train.loss_group_rows} does not "
                              f"divide data.global_batch_size={self.data.global_batch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks that name the dotted key.


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, f"expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {k: _check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(dotted, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _check_type(dotted, value, hints[key])
    return cls(**kwargs)


def _parse_override_value(text: str) -> Any:
    # YAML scalars: 4 -> int, 1e-4 -> float, true -> bool, null -> None, [1, 2] -> list.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)  # PyYAML reads "1e-4" as a string
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict (a copy)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, f"'{part}' is not a section")
        node[parts[-1]] = _parse_override_value(text)
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "").validate()


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (None: built-in K2 defaults) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path}: not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path}: not valid YAML ({err.__class__.__name__})")
        if not isinstance(data, dict):
            raise UserError(f"config file {path}: expected a mapping at the top level")
    return config_from_dict(apply_overrides(data, overrides or []))


def model_config_from_hf(hf_config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Derive a ModelConfig from a Hugging Face LlamaForCausalLM config.json dict."""
    if hf_config.get("model_type") not in (None, "llama"):
        raise UserError(f"config.json: model_type {hf_config.get('model_type')!r} is not 'llama'")
    # Older configs (K2's) carry rope_theta/rope_scaling; transformers 5 writes rope_parameters.
    rope = hf_config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if hf_config.get("rope_scaling") or rope_type != "default":
        raise UserError("config.json: rope scaling is not supported (K2 uses none), got "
                        f"{hf_config.get('rope_scaling') or rope}")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise UserError("config.json: attention_bias/mlp_bias are not supported (K2 has no biases)")
    num_heads = hf_config["num_attention_heads"]
    fields = dict(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
        head_dim=hf_config.get("head_dim"),
        max_position_embeddings=hf_config.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"),
        pad_token_id=hf_config.get("pad_token_id"),
    )
    fields.update(overrides)
    config = _build(ModelConfig, fields, "model")
    config.validate()
    return config
