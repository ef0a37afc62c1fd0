"""data.per_device_batch_size (MaxText's): the global batch is it x the mesh's devices, resolved
where the devices are known (the trainer, `k2jax aot`); every other use needs the global batch
and says so in one line."""

from __future__ import annotations

import pytest
import yaml

from k2jax.config import load_config, resolve_device_batch
from k2jax.errors import ConfigError
from train_utils import SMALL_MODEL, TINY

# The tiny model with its batch given per device only.
PER_DEVICE = [o for o in SMALL_MODEL if not o.startswith("data.")] + [
    "data.seq_len=16", "data.global_batch_size=null", "data.micro_batch_size=null"]


def per_device(*extra: str):
    return load_config(TINY, PER_DEVICE + list(extra), per_device_batch=True)


def test_global_batch_is_per_device_times_devices_and_micro_follows():
    config = per_device("data.per_device_batch_size=4")
    assert config.data.global_batch_size is None  # open until the devices are known
    resolved = resolve_device_batch(config, 256)
    assert (resolved.data.global_batch_size, resolved.data.micro_batch_size) == (1024, 1024)
    assert resolved.data.accumulation_steps == 1 and resolved.data.per_device_batch_size == 4
    assert config.data.global_batch_size is None  # the loaded config is not changed


def test_a_given_micro_batch_is_kept_and_checked():
    resolved = resolve_device_batch(per_device("data.per_device_batch_size=4",
                                               "data.micro_batch_size=256"), 256)
    assert (resolved.data.global_batch_size, resolved.data.accumulation_steps) == (1024, 4)
    with pytest.raises(ConfigError, match=r"^config key 'data.micro_batch_size': 300 does not "
                                          r"divide data.global_batch_size=1024$"):
        resolve_device_batch(per_device("data.per_device_batch_size=4",
                                        "data.micro_batch_size=300"), 256)


def test_fractions_of_a_row_per_device_are_allowed_when_the_rows_are_whole():
    assert resolve_device_batch(per_device("data.per_device_batch_size=0.5"),
                                8).data.global_batch_size == 4
    assert resolve_device_batch(per_device("data.per_device_batch_size=0.7"),
                                10).data.global_batch_size == 7  # 7.000000000000001 in floats
    with pytest.raises(ConfigError, match=r"^config key 'data.per_device_batch_size': 0.3 x 8 "
                                          r"devices = 2.4 rows: expected a whole number of rows$"):
        resolve_device_batch(per_device("data.per_device_batch_size=0.3"), 8)


def test_a_conflicting_global_batch_is_one_line_and_an_agreeing_one_is_fine():
    config = per_device("data.per_device_batch_size=2", "data.global_batch_size=16")
    assert resolve_device_batch(config, 8).data.global_batch_size == 16
    with pytest.raises(ConfigError) as err:
        resolve_device_batch(config, 4)
    assert str(err.value) == ("config key 'data.global_batch_size': 16 conflicts with "
                              "data.per_device_batch_size=2 x 4 devices = 8; set one of them")


@pytest.mark.parametrize("value, problem", [
    ("0", "must be positive or null, got 0"),
    ("-1", "must be positive or null, got -1"),
    ("two", "expected int or float or null, got 'two'"),
])
def test_bad_values_are_one_line(value, problem):
    with pytest.raises(ConfigError, match=f"^config key 'data.per_device_batch_size': {problem}"):
        per_device(f"data.per_device_batch_size={value}")


def test_uses_that_do_not_know_the_devices_ask_for_the_global_batch():
    with pytest.raises(ConfigError, match=r"^config key 'data.per_device_batch_size': needs the "
                                          r"number of devices.*give data.global_batch_size"):
        load_config(TINY, PER_DEVICE + ["data.per_device_batch_size=4"])


def test_without_it_nothing_changes():
    config = load_config(None)
    assert (config.data.global_batch_size, config.data.micro_batch_size) == (256, 256)
    assert resolve_device_batch(config, 512) is config
    tiny = load_config(TINY)
    assert (tiny.data.global_batch_size, tiny.data.micro_batch_size) == (16, 8)


def test_the_data_commands_refuse_it_in_one_line(tmp_path, capsys):
    from k2jax.cli import main

    path = tmp_path / "pd.yaml"
    path.write_text(yaml.safe_dump({"data": {"per_device_batch_size": 2}}))
    assert main(["data", "locate", "--config", str(path), "--step", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.per_device_batch_size" in err[0], err


@pytest.mark.slow  # a train step's compile: ~10 s on a loaded 2-core VM
def test_the_trainer_honours_it_on_its_devices(tmp_path):
    """One CPU device here: 3 rows per device make a global batch of 3 x 1, and the run's saved
    config records the rows it trained on."""
    import jax

    from k2jax.train.trainer import Trainer
    from train_utils import read_metrics

    config = per_device("data.per_device_batch_size=3", f"train.run_dir={tmp_path}",
                        "train.steps=1", "train.checkpoint_every=1")
    trainer = Trainer(config)
    assert trainer.config.data.global_batch_size == 3 * jax.device_count()
    assert trainer.run() == 0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert (saved["global_batch_size"], saved["per_device_batch_size"]) == (3, 3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
