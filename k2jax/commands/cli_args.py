"""The arguments every command spells the same way: `--config FILE` plus `key=value` overrides
(with the older flags kept as aliases of their config keys), the progress switch, dtypes, and
the help layout (every default shown, an example per command).

A command that reads K2's data takes its data settings from a config like `train` does; without
`--config` that is the `k2-65b` preset shipped inside the package (k2jax.config.PRESET_DIR), so
an installed wheel works without a clone and K2's figures have one owner.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import re
import sys
from typing import Any, Callable, Optional, Sequence

from k2jax import dtypes
from k2jax.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default ("unset" ones say what happens in their help) and keeps the
    line breaks of a multi-line description or epilog (a one-line one is wrapped)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _format_action(self, action: argparse.Action) -> str:
        if (not action.help and action.option_strings and not action.required
                and action.default not in (None, argparse.SUPPRESS)):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def add_command(subparsers, name: str, help: str, example: str, description: str = "",
                **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser whose --help shows every default and ends with an example."""
    parser = subparsers.add_parser(name, help=help, description=description or help,
                                   epilog=f"example:\n  {example}", formatter_class=HelpFormatter,
                                   **kwargs)
    parser.set_defaults(command_parser=parser)  # cli.py: usage and error prefix of this command
    return parser


def add_command_group(subparsers, name: str, help: str, example: str, description: str,
                      metavar: str) -> argparse._SubParsersAction:
    """A command made of subcommands (`k2jax data index`, ...): returns the subparsers to add
    them to; the command alone prints its help and exits 2."""
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=HelpFormatter,
                                   epilog=f"example:\n  {example}")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1], command_parser=parser)
    return parser.add_subparsers(dest=f"{name}_command", metavar=metavar)


@contextlib.contextmanager
def worded_as_flags(flags: dict[str, str]):
    """Library modules name their parameters in errors (`top_p must be in (0, 1]`); a command's
    user typed flags: re-word the errors raised inside as those flags (`--top-p must be ...`).
    A name with an underscore is replaced anywhere; a plain word (`run`, `out`) only where it
    opens the message, the place a parameter's name takes."""
    try:
        yield
    except UserError as err:
        if not flags:
            raise
        names = "|".join(map(re.escape, sorted(flags, key=len, reverse=True)))
        def flag(match: re.Match) -> str:
            name = match.group(1)
            anywhere = "_" in name or "=" in name
            return flags[name] if anywhere or match.start() == 0 else name
        text = re.sub(rf"(?<![\w.-])({names})(?![\w-])", flag, str(err))
        raise UserError(text) from None


PROGRESS_HELP = ("progress on stderr: auto (a bar on a terminal, else one line at a time, for "
                 "log files), bar, lines or none")


def add_progress_flags(p: argparse.ArgumentParser) -> None:
    """--progress MODE, and --no-progress/--quiet for `--progress none`: one switch
    (args.progress, a k2jax.progress mode) in every command."""
    from k2jax.progress import MODES

    p.add_argument("--progress", choices=MODES, default="auto", help=PROGRESS_HELP)
    p.add_argument("--no-progress", "--quiet", dest="progress", action="store_const",
                   const="none", help="no progress output (--progress none)")


def dtype_type(allowed: Sequence[dtypes.DType] = dtypes.TABLE, where: str = "--dtype",
               full_name: bool = False) -> Callable[[str], str]:
    """argparse type: either spelling (bf16 or bfloat16) -> the short name (bf16), or with
    `full_name` the name (bfloat16)."""
    def parse(text: str) -> str:
        try:
            found = dtypes.parse(text, where, tuple(allowed))
            return found.name if full_name else found.short
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None
    parse.__name__ = "dtype"  # argparse's "invalid dtype value" message
    return parse


def dtype_metavar(allowed: Sequence[dtypes.DType] = dtypes.TABLE) -> str:
    return "{" + ",".join(f"{d.short},{d.name}" for d in allowed) + "}"


def add_rope_freq_dtype_arg(p: argparse.ArgumentParser, default: Optional[str],
                            why: str) -> None:
    """--rope-freq-dtype of eval-loss and compare-hf (k2jax/eval/rope_frequencies.py): each
    command defaults to its own purpose, `why` (None: unset, the command decides)."""
    allowed = (dtypes.FLOAT32, dtypes.BFLOAT16)
    p.add_argument("--rope-freq-dtype", default=default, metavar=dtype_metavar(allowed),
                   type=dtype_type(allowed, "--rope-freq-dtype", full_name=True),
                   help=f"RoPE inverse frequencies rounded to this dtype "
                        f"({default or 'unset'}: {why}); "
                        "bfloat16 = K2 as trained, float32 = transformers")


@dataclasses.dataclass(frozen=True)
class Alias:
    """A flag kept for users' scripts that sets one config key."""

    flag: str
    key: str  # dotted config key
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def dest(self) -> str:
        return "alias_" + self.flag.lstrip("-").replace("-", "_")


DATA_PATH = Alias("--data", "data.path", {"metavar": "DIR", "help": "directory of the chunk "
                  "files (chunk_{i}.jsonl, indexed with `k2jax data index`, or their packed "
                  "form)"})
ORDER = Alias("--order", "data.order", {"help": "k2-stage1, k2-stage2, sequential, or "
              "comma-separated chunk ids (a prefix of k2-stage1's list gives the same rows "
              "with fewer files)"})
GLOBAL_BATCH = Alias("--global-batch", "data.global_batch_size", {"type": int,
                     "help": "rows per step"})
START_ROW = Alias("--start-row", "data.start_row", {"type": int, "help": "global row of step 0"})
SEQ_LEN = Alias("--seq-len", "data.seq_len", {"type": int, "help": "tokens per row"})
VOCAB_SIZE = Alias("--vocab-size", "model.vocab_size", {"type": int,
                   "help": "token ids must be below this"})
FORMAT = Alias("--format", "data.format", {"choices": ("auto", "jsonl", "packed")})
INDEX_DIR = Alias("--index-dir", "data.index_dir", {"metavar": "DIR", "help": "where the line "
                  "index lives (unset: DATA/.k2index; for read-only data)"})
USE_TGT_MASK = Alias("--use-tgt-mask", "data.use_tgt_mask", {
    "action": argparse.BooleanOptionalAction,
    "help": "apply rows' tgt_mask (K2's stage-1 training code never read it)"})

# The settings that say which rows a step reads (`k2jax data batch`, eval-loss, compare-hf).
STEP_DATA_ALIASES = (DATA_PATH, ORDER, GLOBAL_BATCH, START_ROW, SEQ_LEN, FORMAT, INDEX_DIR,
                     USE_TGT_MASK)
LOSS_NORMALIZATION = Alias("--loss-normalization", "train.loss_normalization", {
    "choices": ("per_group", "global"),
    "help": "per_group: mean over groups of train.loss_group_rows consecutive rows of each "
            "group's masked mean (Megatron's, what K2's W&B log shows); global: "
            "sum(loss * mask) / sum(mask) over the batch"})
LOSS_GROUP_ROWS = Alias("--loss-group-rows", "train.loss_group_rows", {
    "type": int, "help": "rows per group for per_group (one data-parallel rank's micro-batch)"})
# eval-loss: which rows, and how a step's loss is normalised over them.
STEP_LOSS_ALIASES = STEP_DATA_ALIASES + (LOSS_NORMALIZATION, LOSS_GROUP_ROWS)


def add_weights_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--hf DIR | --checkpoint DIR, at most one (exactly one if `required`): the weights a
    command runs (k2jax/weights/)."""
    weights = p.add_mutually_exclusive_group(required=required)
    weights.add_argument("--hf", metavar="DIR", help="Hugging Face LlamaForCausalLM directory "
                         "(safetensors or .bin shards), converted in memory")
    weights.add_argument("--checkpoint", metavar="DIR", help="k2jax weights directory, training "
                         "checkpoint step directory, or run directory (its latest complete "
                         "checkpoint)")


def add_config_args(p: argparse.ArgumentParser, aliases: Sequence[Alias]) -> None:
    """--config (default: K2's preset), key=value overrides, and `aliases` as flags."""
    from k2jax.config import K2_PRESET

    p.add_argument("--config", default=None, metavar="FILE|PRESET",
                   help=f"YAML config or preset name (unset: {K2_PRESET}, K2's config shipped "
                        "with k2jax)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. data.order=0,1,2 data.seq_len=4096")
    aliases_group = p.add_argument_group("aliases of config keys (unset: the config's value)")
    for alias in aliases:
        kwargs = dict(alias.kwargs)
        if "choices" not in kwargs and "action" not in kwargs:
            kwargs.setdefault("metavar", alias.key.split(".")[-1].upper())
        default = ("required unless --config names it" if alias is DATA_PATH else
                   f"default: the config's, {K2_PRESET}: {_k2_preset_value(alias.key)}")
        kwargs["help"] = f"{kwargs.get('help', '')} (= {alias.key}; {default})".lstrip()
        aliases_group.add_argument(alias.flag, dest=alias.dest, default=argparse.SUPPRESS,
                                   **kwargs)


@functools.lru_cache(maxsize=None)
def _k2_preset() -> Any:
    from k2jax.config import K2_PRESET, load_config

    return load_config(K2_PRESET)


def _k2_preset_value(key: str) -> Any:
    section, name = key.split(".")
    value = getattr(getattr(_k2_preset(), section), name)
    return str(value).replace("%", "%%") if value is not None else "unset"  # argparse formats help


def given_aliases(args: argparse.Namespace, aliases: Sequence[Alias]) -> list[Alias]:
    return [a for a in aliases if getattr(args, a.dest, None) is not None]


def config_dict_from_args(args: argparse.Namespace, aliases: Sequence[Alias]) -> dict[str, Any]:
    """The config file (or K2's preset) with the overrides and the alias flags applied; a key
    set both ways is refused."""
    from k2jax.config import K2_PRESET, load_config_dict

    data = load_config_dict(args.config or K2_PRESET, args.overrides)
    overridden = {item.split("=", 1)[0].strip() for item in args.overrides}
    for alias in given_aliases(args, aliases):
        if alias.key in overridden:
            raise UserError(f"{alias.flag} and {alias.key}=... both set {alias.key}; give one")
        section, key = alias.key.split(".")
        data.setdefault(section, {})[key] = getattr(args, alias.dest)
    return data


def k2_data_config(args: argparse.Namespace, aliases: Sequence[Alias] = STEP_DATA_ALIASES,
                   model: Optional[Any] = None, computes_loss: bool = False):
    """The Config whose data section says which rows a command reads and how.

    The data source is the config's, as `train` reads it (synthetic, K2 chunk files, packed or
    chat rows); the whole step is one micro-batch (these commands read rows, they do not
    train); `model` (a ModelConfig, e.g. the weights') replaces the config's model section;
    `computes_loss` keeps train.loss_normalization for eval-loss, for a batch of any size (a
    last partial group under per_group, train/loss_weights.py). Chunk files must be named
    (--data or data.path=) unless a --config names them: the preset's is a placeholder."""
    from k2jax.config import DataConfig, ModelConfig, TrainConfig, config_from_dict

    data = config_dict_from_args(args, aliases)
    section = data.setdefault("data", {})
    named = (args.config is not None or getattr(args, DATA_PATH.dest, None) is not None
             or any(o.strip().startswith("data.path=") for o in args.overrides))
    if section.get("source", DataConfig.source) == "k2" and not named:
        raise UserError("--data DIR is required (or a --config whose data.path names the files)")
    train = data.setdefault("train", {})
    group_rows = train.get("loss_group_rows", TrainConfig.loss_group_rows)
    if not computes_loss:  # only rows are read: how a loss would be normalised is moot
        train["loss_normalization"] = "global"
    elif isinstance(group_rows, int) and group_rows > 0:
        # Divisibility is the training run's check; an evaluation takes any batch.
        train["loss_group_rows"] = 1
    section["micro_batch_size"] = section.get("global_batch_size", DataConfig.global_batch_size)
    if model is not None:
        data["model"] = dataclasses.asdict(model)
    else:  # no model runs here: its context length does not limit the rows a command reads
        seq_len = section.get("seq_len", DataConfig.seq_len)
        model_section = data.setdefault("model", {})
        context = model_section.get("max_position_embeddings", ModelConfig.max_position_embeddings)
        if isinstance(seq_len, int) and isinstance(context, int):  # else validation names it
            model_section["max_position_embeddings"] = max(seq_len, context)
    config = config_from_dict(data)
    if computes_loss and config.train.loss_group_rows != group_rows:
        config.train.loss_group_rows = group_rows  # validated (positive) as given
    return config


# With --run-dir the run's config decides everything but where the files are on this machine.
RUN_DIR_ALIASES = (DATA_PATH, FORMAT, INDEX_DIR)


def add_run_dir_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--run-dir", metavar="RUN",
                   help="follow this training run: its config.yaml (data source, order, batch, "
                        "loss) and the rows its rollbacks moved (data_order.json); with it "
                        f"--data defaults to the run's data.path{what}")


def step_data_config(args: argparse.Namespace, aliases: Sequence[Alias] = STEP_DATA_ALIASES,
                     model: Optional[Any] = None, computes_loss: bool = False):
    """(Config, moved row windows or None) of the rows a command reads: the run's with
    --run-dir (only where its files are may be given), else k2_data_config's."""
    if getattr(args, "run_dir", None) is None:
        return k2_data_config(args, aliases, model, computes_loss), None
    from k2jax.run_dir import RunDir

    fixed = [a.flag for a in given_aliases(args, aliases) if a not in RUN_DIR_ALIASES]
    fixed += ["--config"] * (args.config is not None) + list(args.overrides)
    if fixed:
        raise UserError(f"{', '.join(fixed)}: set by the run's config with --run-dir "
                        f"{args.run_dir}; give only --data, --format, --index-dir")
    run_dir = RunDir(args.run_dir)
    config = run_dir.load_config()
    path = getattr(args, DATA_PATH.dest, None)
    if path is not None:  # where the same chunk files live on this machine
        config.data.path = path
    form, index_dir = getattr(args, FORMAT.dest, None), getattr(args, INDEX_DIR.dest, None)
    if form is not None or index_dir is not None:
        config.data.format, config.data.index_dir = form or "auto", index_dir
    config.data.micro_batch_size = config.data.global_batch_size
    if not computes_loss:
        config.train.loss_normalization = "global"
    if model is not None:
        config.model = model
    return config, run_dir.moved_row_ranges(config)


def stderr_log(message: str) -> None:
    """A command's progress line on stderr (stdout carries results)."""
    print(message, file=sys.stderr, flush=True)
