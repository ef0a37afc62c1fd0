"""Typed run configuration: YAML files in configs/ plus `section.key=value` overrides.

Every field has a type; loading checks names, types and cross-field consistency and raises
ConfigError naming the dotted key. The dataclasses are the single list of settings. This module
is the schema; typed construction lives in k2jax/config_build.py, and files, `base:` chains,
presets and overrides in k2jax/config_files.py.

The defaults are neutral, not K2's: K2's figures live once, in configs/k2-65b.yaml (shipped in
the package as the preset `k2-65b`, see `resolve_config_path`), so a fact about K2 has one
owner. Neutral means: the architecture fields default to transformers' LlamaConfig (Llama-2-7B
shapes, the values a LlamaForCausalLM config.json falls back to); the recipe to the LLaMA
paper's AdamW (peak 3e-4 decayed to 10%, 2000 warm-up steps, betas 0.9/0.95, weight decay
0.1, clipping 1.0; optax's eps); data to the synthetic source read in file order; and the
run's length, batch and checkpoint cadence to round numbers. A config that means K2 says
`base: k2-65b.yaml`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

from k2jax import dtypes
from k2jax.config_build import build_section
# The loading side, re-exported so `from k2jax.config import load_config, ...` stays the one
# import of callers.
from k2jax.config_files import (  # noqa: F401
    K2_PRESET, PRESET_DIR, apply_overrides, load_config_dict, preset_names, read_config_file,
    resolve_config_path)
from k2jax.errors import ConfigError

DEFAULT_BATCH_ROWS = 256  # data.global_batch_size and micro_batch_size when neither is given
MESH_AXES = ("data", "fsdp", "tensor")  # k2jax.sharding.mesh.AXES, without importing jax
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_out",
                  "offload_qkv_out", "offload_input_qkv_out", "custom")
# The tensors of a layer `model.remat: custom` can keep (model.remat_save) or move to host
# memory (model.remat_offload) between the passes; MaxText's custom policy names them
# decoder_layer_input, query_proj, key_proj, value_proj, context, out_proj, mlpwo.
REMAT_TENSORS = ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "context",
                 "attention_out", "mlp_out")


@dataclasses.dataclass
class ModelConfig:
    """A LLaMA architecture (Hugging Face LlamaForCausalLM fields) and how to compute it."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    # swiglu: LLaMA's down(silu(gate(x)) * up(x)), 3 matrices. relu / gelu: down(act(up(x))),
    # 2 matrices (MaxText's base model before 2024-02, its GPT-3; for the step-time
    # calibration, not HF).
    mlp_activation: Literal["swiglu", "relu", "gelu"] = "swiglu"
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    # Not given in a config file: 2048, or data.seq_len when that is longer.
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # RoPE inverse frequencies rounded to this dtype (then used in fp32). K2's Megatron run had
    # them in bf16 (a buffer rounded by Float16Module); transformers keeps fp32.
    rope_freq_dtype: Literal["float32", "bfloat16"] = "float32"
    # Logits rounded to this dtype before the fp32 loss, and their gradient likewise in the
    # backward. K2's output_layer is a bf16 linear (k2-train megatron/model/gpt_model.py).
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    # The loss's logits made and dropped this many positions at a time (model/chunked_loss.py):
    # only one chunk's [rows, chunk, vocab] exists, and the backward recomputes it (one more
    # head matmul, ~2 x tokens x hidden x vocab FLOPs a step). auto: chunked only where one
    # device's fp32 logits of a micro-batch would pass 1 GiB (chunks of <= 512 MiB); an int:
    # that many (it must divide data.seq_len); null or 0: never. Same loss, fp32 sums reordered.
    loss_chunk_tokens: Union[int, Literal["auto"], None] = "auto"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # Megatron's init: o_proj and down_proj at initializer_range / sqrt(2 * num_layers).
    scaled_output_init: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    scan_layers: bool = True
    remat: str = "full"
    # remat custom: the REMAT_TENSORS kept on device / offloaded to pinned host memory (the
    # rest recomputed), as MaxText's remat_policy custom with "device" / "offload" per tensor.
    remat_save: list[str] = dataclasses.field(default_factory=list)
    remat_offload: list[str] = dataclasses.field(default_factory=list)
    attention: Literal["auto", "xla", "pallas", "splash", "cudnn"] = "auto"
    attention_block_q: Optional[int] = None  # None: per-TPU-generation default
    attention_block_kv: Optional[int] = None
    # splash's backward kernels (MaxText's sa_block_q_dq, sa_block_kv_dq, sa_block_q_dkv,
    # sa_block_kv_dkv), None: the forward's blocks; fused: dq inside the dk/dv kernel.
    attention_backward_blocks: Optional[list[int]] = None
    attention_fused_backward: bool = False

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
            found = dtypes.find(getattr(self, key))
            if found is None:
                raise ConfigError(f"model.{key}", f"expected one of {dtypes.spellings()}, "
                                  f"got {getattr(self, key)!r}")
            setattr(self, key, found.name)  # "bf16" -> "bfloat16", the name jnp and HF take
        if self.remat not in REMAT_POLICIES:
            raise ConfigError("model.remat", f"expected one of {REMAT_POLICIES}, got {self.remat!r}")
        self._validate_custom_remat()
        if self.loss_chunk_tokens != "auto" and (self.loss_chunk_tokens or 0) < 0:
            raise ConfigError("model.loss_chunk_tokens", f"expected a positive number of "
                              f"positions, auto, 0 or null, got {self.loss_chunk_tokens!r}")
        blocks = self.attention_backward_blocks
        if blocks is not None and (len(blocks) != 4 or any(b <= 0 or b % 128 for b in blocks)):
            raise ConfigError("model.attention_backward_blocks", f"expected 4 positive multiples "
                              f"of 128 [block_q_dq, block_kv_dq, block_q_dkv, block_kv_dkv], "
                              f"got {blocks!r}")


    def _validate_custom_remat(self) -> None:
        for key in ("remat_save", "remat_offload"):
            names = getattr(self, key)
            if names and self.remat != "custom":
                raise ConfigError(f"model.{key}", f"only with model.remat custom (got "
                                  f"{self.remat!r})")
            unknown = [n for n in names if n not in REMAT_TENSORS]
            if unknown:
                raise ConfigError(f"model.{key}", f"unknown tensor(s) {unknown} (known: "
                                  f"{', '.join(REMAT_TENSORS)})")
        both = sorted(set(self.remat_save) & set(self.remat_offload))
        if both:
            raise ConfigError("model.remat_offload", f"{both} also in model.remat_save: a tensor "
                              f"is kept on device or offloaded, not both")


@dataclasses.dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up + cosine schedule (K2's: configs/k2-65b.yaml)."""

    peak_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    decay_steps: int = 100000  # the step at which the cosine reaches min_lr
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    # The lr schedule (train/schedule.py). k2: warm-up from step 0, cosine to min_lr at
    # decay_steps (K2's stage 1). constant / linear_decay: a warm-up of warmup_steps starting at
    # schedule_start_step, then peak_lr (constant) or peak_lr falling linearly to min_lr at
    # decay_steps (linear_decay): a schedule of its own for a run continuing another one.
    schedule: Literal["k2", "constant", "linear_decay"] = "k2"
    schedule_start_step: int = 0

    def validate(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("optimizer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.decay_steps <= self.warmup_steps:
            raise ConfigError("optimizer.decay_steps", f"must exceed optimizer.warmup_steps "
                              f"({self.warmup_steps}), got {self.decay_steps}")
        if self.schedule_start_step < 0 or (self.schedule == "k2" and self.schedule_start_step):
            raise ConfigError("optimizer.schedule_start_step", f"must be >= 0, and 0 with "
                              f"optimizer.schedule k2 (its warm-up starts at step 0), got "
                              f"{self.schedule_start_step}")
        decay_from = self.schedule_start_step + self.warmup_steps
        if self.schedule == "linear_decay" and self.decay_steps <= decay_from:
            raise ConfigError("optimizer.decay_steps", f"linear_decay needs decay_steps past "
                              f"optimizer.schedule_start_step + warmup_steps ({decay_from}), "
                              f"got {self.decay_steps}")
        if not self.peak_lr > 0:  # checked first: min_lr's bound below is peak_lr
            raise ConfigError("optimizer.peak_lr", f"must be positive, got {self.peak_lr}")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ConfigError("optimizer.min_lr", f"must be in [0, peak_lr={self.peak_lr}], "
                              f"got {self.min_lr}")


@dataclasses.dataclass
class DataConfig:
    """Where batches come from. `global_batch_size` rows of `seq_len` tokens per step."""

    source: Literal["synthetic", "k2"] = "synthetic"
    path: Optional[str] = None  # directory of chunk_{i}.jsonl (and its index / packed form)
    # Preset name or explicit chunk id list ("0,1,2" is read as [0, 1, 2]).
    order: Union[str, list[int]] = "sequential"
    format: Literal["auto", "jsonl", "packed"] = "auto"
    index_dir: Optional[str] = None  # line-offset index of jsonl chunks; None: <path>/.k2index
    seq_len: int = 2048
    # Rows per optimizer step. null: 256, or per_device_batch_size x devices when that is set.
    global_batch_size: Optional[int] = None
    # Rows per accumulation micro-step, over the whole mesh. null: 256, or with
    # per_device_batch_size the whole global batch (one micro-step, as MaxText without
    # gradient accumulation).
    micro_batch_size: Optional[int] = None
    # MaxText's per_device_batch_size: the global batch is this x the number of devices of the
    # mesh (all slices), known only when the devices are (`resolve_device_batch`: the trainer
    # and `k2jax aot` do it). A fraction is allowed where the product is whole. null: unused.
    per_device_batch_size: Optional[Union[int, float]] = None
    start_row: int = 0  # global row offset added to step * global_batch_size
    # The step that reads row start_row of the order: step t reads rows from start_row +
    # (t - first_step) * global_batch_size. 0 for a run whose order starts with its first step;
    # K2's stage 2 (configs/k2-stage2.yaml) numbers its steps on after stage 1 (338760) while its
    # order, chunks 360..379, starts afresh.
    first_step: int = 0
    # Passes over a finite order (fine-tuning a small prepared set): epoch e >= 1 reads the
    # same rows in a seeded permutation of its own (k2jax/data/epochs.py). 1 in K2's configs.
    epochs: int = 1
    # Apply rows' per-token `tgt_mask`. False is K2's stage 1: its main.py never reads the
    # field (loss mask = ones but the last position), so K2's own runs ignored it.
    use_tgt_mask: bool = False
    # Documents packed in one row (chat SFT rows of `k2jax data prepare-chat`, which writes
    # each row's segment ids beside its chunk file): reset_attention_mask keeps attention within
    # a document, reset_position_ids restarts RoPE positions at each document's first token.
    # Both false is K2's pretraining (its main.py asserts Megatron's flags of these names off).
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    chat: "ChatConfig" = dataclasses.field(default_factory=lambda: ChatConfig())
    # [start, count] global row windows moved to the end of the order, applied in turn
    # (what K2's team did by hand after a malignant loss spike; rollback appends here).
    moved_row_ranges: list[list[int]] = dataclasses.field(default_factory=list)
    worker_count: int = 0
    prefetch: int = 2
    # Fault injection for the synthetic source (tests of spike handling): [start, count] windows
    # of original rows replaced by uniform random tokens, or given a non-finite loss mask.
    synthetic_poison_rows: list[list[int]] = dataclasses.field(default_factory=list)
    synthetic_poison_kind: Literal["random", "nonfinite"] = "random"
    # What a "chunk file" is for the synthetic source (rollback_unit: chunk): consecutive
    # windows of this many rows.
    synthetic_chunk_rows: int = 1000000

    def __post_init__(self):
        if self.per_device_batch_size is None:  # the batch does not depend on the devices
            if self.global_batch_size is None:
                self.global_batch_size = DEFAULT_BATCH_ROWS
            if self.micro_batch_size is None:
                self.micro_batch_size = DEFAULT_BATCH_ROWS
        elif self.global_batch_size is not None and self.micro_batch_size is None:
            self.micro_batch_size = self.global_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    @property
    def batch_resolved(self) -> bool:
        """False while per_device_batch_size waits for the device count."""
        return self.global_batch_size is not None

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", f"must be at least 2, got {self.seq_len}")
        if self.per_device_batch_size is not None and not self.per_device_batch_size > 0:
            raise ConfigError("data.per_device_batch_size", f"must be positive or null, got "
                              f"{self.per_device_batch_size}")
        for key in ("global_batch_size", "micro_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"data.{key}", f"must be positive, got {getattr(self, key)}")
        if self.batch_resolved and self.micro_batch_size is not None and (
                self.global_batch_size % self.micro_batch_size):
            raise ConfigError("data.micro_batch_size", f"{self.micro_batch_size} does not divide "
                              f"data.global_batch_size={self.global_batch_size}")
        for i, window in enumerate(self.moved_row_ranges):
            if len(window) != 2 or window[0] < 0 or window[1] <= 0:
                raise ConfigError(f"data.moved_row_ranges[{i}]", f"expected [start >= 0, count > 0], "
                                  f"got {window}")
        if self.source == "k2" and not self.path:
            raise ConfigError("data.path", "required when data.source is 'k2'")
        self.order = parse_order(self.order, "data.order")
        if isinstance(self.order, list) and (not self.order or min(self.order) < 0):
            raise ConfigError("data.order", f"expected a preset name or a non-empty list of "
                              f"chunk ids >= 0, got {self.order}")
        if self.synthetic_chunk_rows <= 0:
            raise ConfigError("data.synthetic_chunk_rows", f"must be positive, got "
                              f"{self.synthetic_chunk_rows}")
        for key in ("worker_count", "prefetch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.first_step < 0:
            raise ConfigError("data.first_step", f"must be >= 0, got {self.first_step}")
        if self.epochs < 1 or (self.epochs > 1 and self.source != "k2"):
            raise ConfigError("data.epochs", f"must be >= 1, and 1 unless data.source is 'k2' "
                              f"(the synthetic source has no end), got {self.epochs}")
        if (self.reset_attention_mask or self.reset_position_ids) and self.source != "k2":
            key = "reset_attention_mask" if self.reset_attention_mask else "reset_position_ids"
            raise ConfigError(f"data.{key}", "needs data.source k2 (chunk files with segment "
                              "ids, from `k2jax data prepare-chat`); the synthetic source has "
                              "no documents")
        self.chat.validate()

    @property
    def uses_segments(self) -> bool:
        """Whether batches carry per-document segment ids and positions."""
        return self.reset_attention_mask or self.reset_position_ids


@dataclasses.dataclass
class ChatConfig:
    """The chat template `k2jax data prepare-chat` renders conversations with
    (k2jax/data/chat.py; docs/data.md "Chat SFT" cites what each K2-Chat choice rests on).

    A system prompt (first message only) is `system_marker` (if any), its content, then
    `system_end` (if any). A user turn is `user_marker` then its content; an assistant turn
    `assistant_marker`, its content, then `assistant_end`. `end_of_chat` (if any) closes the
    conversation. Loss goes to assistant content and `assistant_end` only: of every assistant
    turn (`all-assistant-turns`), or of the last one, earlier replies being context (`final`).
    Neutral defaults; K2-Chat's template is configs/k2-chat.yaml.
    """

    user_marker: str = "<|user|>"
    assistant_marker: str = "<|assistant|>"
    # None: a system message's content goes first as plain text, without a marker.
    system_marker: Optional[str] = None
    # After the system prompt's content (K2-Chat: <|endofsystemprompt|>); None: nothing.
    system_end: Optional[str] = None
    assistant_end: str = "</s>"
    end_of_chat: Optional[str] = None  # K2-Chat: <|endofchat|>, loss 0
    trained_turns: Literal["all-assistant-turns", "final"] = "all-assistant-turns"
    # A conversation longer than data.seq_len: drop (counted and reported) or truncate (keep
    # its first seq_len tokens; counted too).
    overlong: Literal["drop", "truncate"] = "drop"

    def markers(self) -> dict[str, str]:
        """role -> marker text, for the roles that have one."""
        found = {"user": self.user_marker, "assistant": self.assistant_marker}
        if self.system_marker is not None:
            found["system"] = self.system_marker
        return found

    def special_texts(self) -> dict[str, str]:
        """data.chat key -> text, for every marker the template renders (each must be one
        token of the tokenizer)."""
        texts = {f"{role}_marker": marker for role, marker in self.markers().items()}
        texts["assistant_end"] = self.assistant_end
        for key in ("system_end", "end_of_chat"):
            if getattr(self, key) is not None:
                texts[key] = getattr(self, key)
        return texts

    def validate(self) -> None:
        for key, text in self.special_texts().items():
            if not text.strip():
                raise ConfigError(f"data.chat.{key}", "must not be empty")
        if self.user_marker == self.assistant_marker:
            raise ConfigError("data.chat.assistant_marker", f"equals data.chat.user_marker "
                              f"({self.user_marker!r}): the turns could not be told apart")
        if self.system_marker == self.user_marker or (
                self.system_marker == self.assistant_marker and self.system_end is None):
            # K2-Chat opens its system prompt with the assistant's marker: its system_end
            # tells the two apart. Without one, or equal to the user's, nothing does.
            raise ConfigError("data.chat.system_marker", f"{self.system_marker!r} equals "
                              f"another role's marker (allowed only equal to "
                              f"data.chat.assistant_marker, with data.chat.system_end set)")


def parse_order(order: Union[str, list[int]], key: str) -> Union[str, list[int]]:
    """data.order as given on a command line: a preset name stays a name; "0,1,2" (or a lone
    "5") becomes the chunk id list [0, 1, 2]. `key` names the setting in the error."""
    if not isinstance(order, str) or not order[:1].isdigit():
        return order
    try:
        return [int(x) for x in order.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(key, f"expected a preset name or comma-separated chunk ids, "
                          f"got {order!r}") from None


@dataclasses.dataclass
class SpikeConfig:
    """Loss-spike detection and the action taken (see k2jax/train/spikes.py)."""

    action: Literal["log", "skip", "rollback"] = "log"
    window: int = 100  # steps in the running median
    threshold: float = 3.0  # a sharp spike is loss > threshold * running median
    min_history: int = 10  # steps observed before ratio spikes are detected
    # A slow rise (K2's malignant spikes rose over 8-34 checkpoints): the mean of the last
    # trend_window losses above the mean of the trend_baseline losses before them by more than
    # trend_margin (a fraction of that baseline) for trend_patience steps in a row. 0: off.
    trend_window: int = 0
    trend_baseline: int = 0
    trend_margin: float = 0.01
    trend_patience: int = 1
    # What `rollback` moves to the end of the order: `file`, the whole chunk files not yet
    # started at the restored checkpoint that hold the spike's first step (what K2's team did:
    # docs/k2.md "Loss spikes"); `chunk`, the rest of the chunk file holding that step from the
    # step on; `step`, that step's rows alone.
    rollback_unit: Literal["file", "chunk", "step"] = "chunk"

    def validate(self) -> None:
        if self.window < 1:
            raise ConfigError("train.spikes.window", f"must be >= 1, got {self.window}")
        if self.threshold <= 1.0:
            raise ConfigError("train.spikes.threshold", f"must be > 1, got {self.threshold}")
        if self.trend_window < 0:
            raise ConfigError("train.spikes.trend_window", f"must be >= 0 (0: off), got "
                              f"{self.trend_window}")
        if self.trend_window and self.trend_baseline < 1:
            raise ConfigError("train.spikes.trend_baseline", f"must be >= 1 with "
                              f"train.spikes.trend_window={self.trend_window}, got "
                              f"{self.trend_baseline}")
        if self.trend_patience < 1:
            raise ConfigError("train.spikes.trend_patience", f"must be >= 1, got "
                              f"{self.trend_patience}")
        if self.trend_margin <= 0:
            raise ConfigError("train.spikes.trend_margin", f"must be > 0, got "
                              f"{self.trend_margin}")


@dataclasses.dataclass
class TrainConfig:
    # The step the run ends at (exclusive), or `auto`: where the data ends, data.first_step +
    # (rows - data.start_row) // data.global_batch_size from the data's index (K2's stage 2:
    # configs/k2-stage2.yaml). Either is checked against the data before any state is built.
    steps: Union[int, Literal["auto"]] = 100000
    run_dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = 1000
    # Also checkpoint after each step that crosses into another chunk file (one checkpoint per
    # file, as K2's stage-2 release has: configs/k2-stage2.yaml).
    checkpoint_at_chunk_ends: bool = False
    keep_checkpoints: int = 3
    keep_period: Optional[int] = None  # also keep every Nth step permanently
    async_checkpoint: bool = True
    resume_step: Optional[int] = None
    # Weights to start from (parameters only): a converted weights directory, a checkpoint step
    # directory, or a run directory (its latest complete step).
    init_from: Optional[str] = None
    # Continue a run from released weights (init_from) at this global step: the lr schedule,
    # the data position and checkpoint numbering continue from it; AdamW's moments start fresh.
    start_step: int = 0
    log_every: int = 1
    peak_flops_per_device: Optional[float] = None  # None: known value for the device kind
    spikes: SpikeConfig = dataclasses.field(default_factory=SpikeConfig)
    # dtype of weight gradients out of the matmuls and of their data-parallel reductions.
    # float32 is K2's (Megatron's fp32 main_grad and fp32 all-reduce) and the safer default:
    # bf16 keeps 8 mantissa bits, so a small per-row contribution summed over thousands of
    # rows is lost in rounding; float32 costs twice the reduce-scatter bytes. (K2's embedding
    # and norm-gain gradients were bf16 tensors, rounded once per 4-row micro-batch before
    # Megatron added them to main_grad; only linear layers accumulate in fp32: docs/k2.md.)
    gradient_dtype: Literal["float32", "bfloat16"] = "float32"
    # XLA/libtpu flags of the train step's compile, LIBTPU_INIT_ARGS-style ("--xla_a=true
    # --xla_b=1"): passed as compiler options on TPU (k2jax/aot/xla_flags.py), so they win over
    # LIBTPU_INIT_ARGS for the flags they name. MaxText's published runs set async-collective ones.
    xla_flags: Optional[str] = None
    # global: sum(loss * mask) / sum(mask) over the global batch. per_group: K2's (Megatron's)
    # mean over consecutive groups of `loss_group_rows` rows of each group's masked mean.
    loss_normalization: Literal["global", "per_group"] = "global"
    loss_group_rows: int = 4  # K2: 4, one data-parallel rank's micro-batch

    def validate(self) -> None:
        from k2jax.aot.xla_flags import parse_xla_flags

        parse_xla_flags(self.xla_flags)  # raises ConfigError naming train.xla_flags
        if self.steps != "auto" and self.steps < 0:
            raise ConfigError("train.steps", f"must be >= 0 or auto, got {self.steps}")
        if self.checkpoint_every <= 0 or self.keep_checkpoints <= 0 or self.log_every <= 0:
            raise ConfigError("train.checkpoint_every", "checkpoint_every, keep_checkpoints "
                              "and log_every must be positive")
        last = math.inf if self.steps == "auto" else max(self.steps, 1)  # auto: checked later
        if self.start_step < 0 or self.start_step >= last:
            raise ConfigError("train.start_step", f"must be in [0, train.steps={self.steps}), "
                              f"got {self.start_step}")
        if self.start_step and not self.init_from:
            raise ConfigError("train.start_step", "needs train.init_from (the weights of that "
                              "step); a run from random weights starts at step 0")
        if self.keep_period is not None and self.keep_period <= 0:  # Orbax: modulo by zero
            raise ConfigError("train.keep_period", f"must be positive or null, got "
                              f"{self.keep_period}")
        if self.loss_group_rows <= 0:
            raise ConfigError("train.loss_group_rows", f"must be positive, got "
                              f"{self.loss_group_rows}")
        self.spikes.validate()


DEFAULT_MESH_RULES: dict[str, Union[str, list[str], None]] = {
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
}


@dataclasses.dataclass
class MeshConfig:
    """Device mesh (per slice, ICI) and across slices (DCN); one -1 is filled from the devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # logical axis name -> mesh axis name(s); every parameter axis must be covered. Given
    # rules (a YAML mapping or `mesh.rules.embed=...`) adjust these defaults, never drop them:
    # replacing the whole table made one override fail on an unrelated axis.
    rules: dict[str, Union[str, list[str], None]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_MESH_RULES))

    def __post_init__(self):
        self.rules = {**DEFAULT_MESH_RULES, **self.rules}

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("mesh", "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}", f"must be positive or -1, got {size}")
        for logical, axes in self.rules.items():
            if logical not in DEFAULT_MESH_RULES:  # a typo (embedd) would be a rule nothing uses
                raise ConfigError(f"mesh.rules.{logical}", "unknown logical axis (known: "
                                  f"{', '.join(DEFAULT_MESH_RULES)})")
            for axis in axes if isinstance(axes, list) else [axes]:
                if axis is not None and axis not in MESH_AXES:
                    raise ConfigError(f"mesh.rules.{logical}", f"'{axis}' is not a mesh axis "
                                      f"(expected one of {list(MESH_AXES)} or null)")


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
        if self.data.first_step > self.train.start_step:
            raise ConfigError("data.first_step", f"{self.data.first_step} is past "
                              f"train.start_step={self.train.start_step}: the run's first step "
                              f"would read before the order's first row")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds "
                              f"model.max_position_embeddings={self.model.max_position_embeddings}")
        chunk = self.model.loss_chunk_tokens
        if chunk != "auto" and chunk and self.data.seq_len % chunk:
            raise ConfigError("model.loss_chunk_tokens", f"{chunk} does not divide "
                              f"data.seq_len={self.data.seq_len}")
        if (self.train.loss_normalization == "per_group" and self.data.batch_resolved
                and self.data.global_batch_size % self.train.loss_group_rows):
            raise ConfigError("train.loss_group_rows", f"{self.train.loss_group_rows} does not "
                              f"divide data.global_batch_size={self.data.global_batch_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_dict(data: dict[str, Any], per_device_batch: bool = False) -> Config:
    """A validated Config from plain data (a loaded YAML file, a run's saved config).

    `per_device_batch`: the caller knows its devices and calls `resolve_device_batch` before
    using the batch, so data.per_device_batch_size may leave the global batch open; any other
    caller needs the global batch now and gets one line saying so."""
    config = build_section(Config, _context_follows_seq_len(data), "").validate()
    if not per_device_batch and not config.data.batch_resolved:
        raise ConfigError("data.per_device_batch_size", "needs the number of devices, which only "
                          "training and AOT planning know; give data.global_batch_size "
                          "(per_device_batch_size x devices) here instead")
    return config


def _context_follows_seq_len(data: dict[str, Any]) -> dict[str, Any]:
    """A config that trains at data.seq_len past LlamaConfig's 2048 without naming
    model.max_position_embeddings means a context of seq_len (MaxText has only
    max_target_length): say so for it. A context that is named is kept, and checked."""
    model, section = data.get("model"), data.get("data")
    seq_len = section.get("seq_len") if isinstance(section, dict) else None
    if (not isinstance(seq_len, int) or isinstance(seq_len, bool)
            or seq_len <= ModelConfig.max_position_embeddings
            or (isinstance(model, dict) and "max_position_embeddings" in model)
            or (model is not None and not isinstance(model, dict))):
        return data
    return {**data, "model": {**(model or {}), "max_position_embeddings": seq_len}}


def resolve_device_batch(config: Config, devices: int) -> Config:
    """The config with data.per_device_batch_size made rows for a mesh of `devices` devices
    (all slices): global_batch_size = per_device_batch_size x devices, and micro_batch_size
    that too unless given. A config without per_device_batch_size is returned as it is; a
    global_batch_size given beside it must agree."""
    data = config.data
    per_device = data.per_device_batch_size
    if per_device is None:
        return config
    product = per_device * devices
    rows = round(product)
    if abs(product - rows) > 1e-9 * max(1, rows) or rows < 1:  # 0.7 x 10 is 7.000000000000001
        raise ConfigError("data.per_device_batch_size", f"{per_device} x {devices} devices = "
                          f"{product:g} rows: expected a whole number of rows")
    if data.global_batch_size is not None and data.global_batch_size != rows:
        raise ConfigError("data.global_batch_size", f"{data.global_batch_size} conflicts with "
                          f"data.per_device_batch_size={per_device} x {devices} devices = "
                          f"{rows}; set one of them")
    micro = rows if data.micro_batch_size is None else data.micro_batch_size
    resolved = dataclasses.replace(data, global_batch_size=rows, micro_batch_size=micro)
    return dataclasses.replace(config, data=resolved).validate()


def model_config_from_dict(data: dict[str, Any], prefix: str = "model") -> ModelConfig:
    """A ModelConfig from plain data (a checkpoint's or config.json's fields), type-checked but
    not validated; `prefix` is the key errors name."""
    return build_section(ModelConfig, data, prefix)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                per_device_batch: bool = False) -> Config:
    """Load a YAML config file or preset name (None: the dataclass defaults) and apply
    overrides. `per_device_batch`: see `config_from_dict`."""
    return config_from_dict(load_config_dict(path, overrides), per_device_batch)
