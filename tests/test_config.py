"""Configs: every K2 figure, overrides, and one clear line for each bad value."""

from pathlib import Path

import pytest

from k2jax.cli import main
from k2jax.config import load_config
from k2jax.errors import ConfigError, UserError
from k2jax.model.param_count import count_params

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_k2_65b_has_every_k2_figure():
    cfg = load_config(CONFIGS / "k2-65b.yaml")
    m, o, d, t = cfg.model, cfg.optimizer, cfg.data, cfg.train
    assert (m.hidden_size, m.intermediate_size, m.num_layers) == (8192, 22016, 80)
    assert (m.num_heads, m.num_kv_heads, m.resolved_head_dim) == (64, 64, 128)
    assert (m.vocab_size, m.max_position_embeddings, m.rope_theta) == (32032, 2048, 10000.0)
    assert (m.rms_norm_eps, m.initializer_range, m.tie_word_embeddings) == (1e-5, 0.02, False)
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (None, 2, 0)
    assert (m.param_dtype, m.compute_dtype) == ("float32", "bfloat16")
    assert (m.rope_freq_dtype, m.scaled_output_init) == ("bfloat16", True)  # as K2 trained
    assert (o.beta1, o.beta2, o.eps, o.weight_decay, o.grad_clip_norm) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (o.peak_lr, o.min_lr, o.warmup_steps, o.decay_steps) == (1.5e-4, 1.5e-5, 2000, 338760)
    assert (d.global_batch_size, d.seq_len, d.order) == (2040, 2048, "k2-stage1")
    assert (t.steps, t.seed, t.checkpoint_every) == (338760, 22238, 941)


def test_k2_chat_context_and_theta():
    cfg = load_config(CONFIGS / "k2-chat.yaml")
    assert (cfg.model.max_position_embeddings, cfg.model.rope_theta) == (8192, 500000.0)
    k2 = load_config(CONFIGS / "k2-65b.yaml")
    assert count_params(cfg.model) == count_params(k2.model)  # K2's architecture, via base:
    assert cfg.optimizer == k2.optimizer and cfg.train.seed == k2.train.seed
    assert (cfg.model.rope_freq_dtype, cfg.model.scaled_output_init) == ("float32", True)


def test_base_merges_sections_and_replaces_values(tmp_path):
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "root.yaml").write_text(
        "model: {num_layers: 2, hidden_size: 32, num_heads: 2, num_kv_heads: 2, vocab_size: 64,"
        " intermediate_size: 64}\ndata: {order: [1, 2, 3], seq_len: 16,"
        " global_batch_size: 4, micro_batch_size: 4}\n")
    (tmp_path / "mid.yaml").write_text("base: parent/root.yaml\nmodel: {num_layers: 3}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ndata: {order: [7]}\n")
    cfg = load_config(tmp_path / "top.yaml", ["model.hidden_size=64"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (3, 64, 2)
    assert cfg.data.order == [7] and cfg.data.seq_len == 16  # lists are replaced, not merged


@pytest.mark.parametrize("text, problem", [
    ("base: missing.yaml\n", "missing.yaml: not found"),
    ("base: loop.yaml\n", "loops back"),
    ("base: [a.yaml]\n", "'base' must be a file name"),
])
def test_bad_base_is_one_line(tmp_path, text, problem):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(UserError, match=problem):
        load_config(tmp_path / "loop.yaml")


def test_dataclass_defaults_are_transformers_rope_and_plain_init():
    from k2jax.config import ModelConfig

    assert (ModelConfig().rope_freq_dtype, ModelConfig().scaled_output_init) == ("float32", False)


def test_param_counts_without_allocating():
    assert count_params(load_config(CONFIGS / "k2-65b.yaml").model) == 65_286_184_960
    assert 2e6 < count_params(load_config(CONFIGS / "tiny.yaml").model) < 1e7
    assert 0.9e9 < count_params(load_config(CONFIGS / "small.yaml").model) < 1.2e9


def test_overrides_on_dotted_keys():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.num_layers=2", "optimizer.peak_lr=1e-4", "optimizer.min_lr=1e-5",
                                              "model.scan_layers=false", "data.order=[3, 1, 2]",
                                              "train.keep_period=null"])
    assert cfg.model.num_layers == 2 and cfg.optimizer.peak_lr == 1e-4
    assert cfg.model.scan_layers is False and cfg.data.order == [3, 1, 2]


@pytest.mark.parametrize("override, key", [
    ("model.num_layerz=2", "model.num_layerz"),
    ("model.num_layers=two", "model.num_layers"),
    ("model.hidden_size=66", "model.hidden_size"),  # not divisible by 4 heads
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.compute_dtype=float8", "model.compute_dtype"),
    ("model.remat=sometimes", "model.remat"),
    ("model.rope_freq_dtype=float16", "model.rope_freq_dtype"),
    ("model.scaled_output_init=yes please", "model.scaled_output_init"),
    ("data.micro_batch_size=5", "data.micro_batch_size"),
    ("data.seq_len=4096", "data.seq_len"),
    ("mesh.data=-1", "mesh"),
    ("train.spikes.action=panic", "train.spikes.action"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert err.value.key == key and "\n" not in str(err.value)


def test_a_key_given_twice_is_one_line_naming_it(tmp_path, capsys):
    """YAML keeps the last of two equal keys silently (configs/k2-65b.yaml once stated
    train.xla_flags twice): a config file saying one key twice is refused, through the CLI."""
    config = tmp_path / "twice.yaml"
    config.write_text("base: %s\ntrain:\n  steps: 3\n  seed: 1\n  steps: 4\n"
                      % (CONFIGS / "tiny.yaml"))
    with pytest.raises(UserError, match=r"twice.yaml:5: key 'steps' is given twice"):
        load_config(config)
    assert main(["aot", "--config", str(config), "--topology", "v5p-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key 'steps' is given twice" in err[0], err
    # The same key in two sections, and every shipped config, are fine.
    config.write_text("model: {seed: 1}\ntrain: {seed: 1}\n")
    from k2jax.config_files import read_config_file

    assert read_config_file(config) == {"model": {"seed": 1}, "train": {"seed": 1}}
    for shipped in sorted(CONFIGS.rglob("*.yaml")):
        read_config_file(shipped)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out
