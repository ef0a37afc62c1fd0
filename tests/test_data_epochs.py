"""data.epochs: a finite order read several times, epoch e >= 1 in a seeded permutation of its
own (k2jax/data/epochs.py, docs/data.md "Epochs")."""

import numpy as np
import pytest

from data_fixtures import SEQ_LEN, reference_rows, write_chunk
from k2jax.cli import main
from k2jax.config import ConfigError, load_config
from k2jax.data.loader import StepLoader
from k2jax.errors import UserError

LINES = {0: 5, 1: 4, 2: 3}  # 12 rows
BATCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("epochs")
    for chunk_id, lines in LINES.items():
        write_chunk(directory, chunk_id, lines)
    assert main(["data", "index", str(directory), "--quiet"]) == 0
    return directory


def loader(data_dir, epochs, batch=BATCH):
    config = load_config("tiny", ["data.source=k2", f"data.path={data_dir}", "data.order=0,1,2",
                                  f"data.seq_len={SEQ_LEN}", f"data.global_batch_size={batch}",
                                  f"data.micro_batch_size={batch}", f"data.epochs={epochs}"])
    return StepLoader.from_config(config)


def first_tokens(batch) -> list[tuple[int, int]]:
    """(chunk id, line) of each row: data_fixtures puts them in a row's first two tokens."""
    return [(int(r[0]), int(r[1])) for r in batch["tokens"]]


def test_one_epoch_is_the_order_and_ends_with_it(data_dir):
    one = loader(data_dir, 1)
    reference, _ = reference_rows(data_dir, [0, 1, 2])
    assert one.available_steps == 3
    for step in range(3):
        np.testing.assert_array_equal(one.global_batch(step)["tokens"],
                                      reference[step * BATCH:(step + 1) * BATCH])
    with pytest.raises(UserError, match="data.epochs=1: more epochs repeat it"):
        one.iter_from_step(0, 4)


def test_later_epochs_are_seeded_permutations_of_every_row(data_dir):
    three = loader(data_dir, 3)
    assert three.available_steps == 9
    rows = [first_tokens(three.global_batch(s)) for s in range(9)]
    epochs = [sum(rows[3 * e:3 * e + 3], []) for e in range(3)]
    every_row = sorted((c, line) for c, n in LINES.items() for line in range(n))
    assert epochs[0] == every_row  # epoch 0: the order itself, as data.epochs=1 reads it
    for later in epochs[1:]:
        assert sorted(later) == every_row and later != epochs[0]  # each row once, reordered
    assert epochs[1] != epochs[2]  # a permutation per epoch
    again = loader(data_dir, 3)  # a rerun (or a resume at any step) reads the same rows
    assert [first_tokens(again.global_batch(s)) for s in (8, 4)] == [rows[8], rows[4]]


def test_a_step_spans_two_epochs(data_dir):
    five = loader(data_dir, 2, batch=5)  # 24 rows: step 2 reads rows 10..14
    epoch1 = loader(data_dir, 2, batch=12).global_batch(1)  # epoch 1 as one batch
    rows = first_tokens(five.global_batch(2))
    order = sorted((c, line) for c, n in LINES.items() for line in range(n))
    assert rows[:2] == order[10:] and rows[2:] == first_tokens(epoch1)[:3]


def test_epochs_are_refused_where_they_mean_nothing():
    with pytest.raises(ConfigError, match="data.epochs"):
        load_config("tiny", ["data.epochs=2"])  # synthetic: no end
    with pytest.raises(ConfigError, match="data.epochs"):
        load_config("tiny", ["data.epochs=0"])


def test_k2s_configs_read_the_order_once():
    for preset in ("k2-65b", "k2-stage2", "k2-chat"):
        assert load_config(preset).data.epochs == 1
