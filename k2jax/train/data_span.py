"""How far a run goes in its data: `train.steps` checked against the data (or, `auto`, read
from it) before any state is built, and the steps that finish a chunk file
(`train.checkpoint_at_chunk_ends`).

Both only need the order's row count and file bounds, which the data's index holds: no row is
read. A run asking for more steps than the data holds is refused here, naming both numbers,
instead of by the loader after a 65B state has been set up.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from k2jax.config import Config, ConfigError
from k2jax.data.loader import UNBOUNDED_STEPS, StepLoader
from k2jax.data.rollback import chunk_bounds


def steps_from_data(config: Config, loader: StepLoader, log: Callable[[str], None]) -> Config:
    """`config` with train.steps a number: `auto` becomes the end of the data; a number is
    checked against it (ConfigError naming both)."""
    data, train = config.data, config.train
    available = loader.available_steps
    rows = loader.source.num_rows
    holds = (f"the data holds {rows} rows = steps up to {available} (data.first_step "
             f"{data.first_step} + ({rows} - data.start_row {data.start_row}) // "
             f"data.global_batch_size {data.global_batch_size})")
    if train.steps == "auto":
        if available == UNBOUNDED_STEPS:
            raise ConfigError("train.steps", "auto needs data with an end (data.source k2); "
                              "synthetic rows never end: give a number")
        log(f"train.steps auto: {available}, where {holds}")
        steps = available
    elif train.steps > available:
        raise ConfigError("train.steps", f"{train.steps} is past the data: {holds}")
    else:
        steps = train.steps
    if train.start_step >= steps:
        raise ConfigError("train.start_step", f"{train.start_step} is not before train.steps "
                          f"({steps})")
    return dataclasses.replace(config, train=dataclasses.replace(train, steps=steps))


def ends_chunk(loader: StepLoader, step: int) -> bool:
    """Whether `step`'s first row and the next step's first row lie in different chunk files
    (or the data ends): the state after `step` has finished a file."""
    start, stop = loader.logical_rows(step)
    if loader.source.num_rows is not None and stop >= loader.source.num_rows:
        return True
    first, following = loader.original_rows(np.asarray([start, stop], np.int64))
    return chunk_bounds(loader, int(first)) != chunk_bounds(loader, int(following))
