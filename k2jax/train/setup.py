"""The training setup, assembled once for the trainer, `k2jax aot` and the train-step
benchmark: mesh, optimizer, padding plan, state shardings, abstract state and the jitted step,
compiled from shapes (MaxText's `get_shaped_batch`, shared by its train.py and
train_compile.py), so compiling reads no data and allocates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from k2jax.config import Config
from k2jax.data.loader import device_batch_shapes
from k2jax.sharding.mesh import build_mesh
from k2jax.sharding.padding import PaddingPlan, data_parallel_size, training_plan
from k2jax.sharding.rules import batch_sharding, replicated
from k2jax.train.optimizer import make_optimizer
from k2jax.train.schedule import learning_rate
from k2jax.train.state import TrainState, create_train_state, state_layout
from k2jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    config: Config
    mesh: Mesh
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule  # the one the optimizer uses: the trainer logs its values
    padding: PaddingPlan  # rows of the device batch
    batch_sharding: NamedSharding  # rows over the data-parallel axes
    shardings: TrainState  # NamedShardings of the state
    abstract_state: TrainState  # ShapeDtypeStructs with their shardings (restore target)
    step: Any  # jitted step(state, batch, loss_ceiling) -> (state, metrics)

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The batch entries (tokens, loss_mask, document fields) [padded rows, S], sharded
        over the batch axes."""
        return device_batch_shapes(self.padding, self.config.data, self.batch_sharding)

    def lower(self):
        """The step lowered for the abstract state and batch shapes (nothing read or
        allocated)."""
        ceiling = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(self.mesh))
        return self.step.lower(self.abstract_state, self.batch_shapes(), ceiling)

    def init_state(self, params: Any = None, start_step: int = 0) -> TrainState:
        """A fresh state (or one wrapping `params`) created directly sharded."""
        return create_train_state(self.config, self.optimizer, self.mesh, self.shardings,
                                  params, start_step)


def build_training_setup(config: Config, devices: Optional[list] = None,
                         process_count: int = 1) -> TrainingSetup:
    """`config`'s setup over `devices` (None: all of jax.devices()); `process_count`: hosts
    feeding the batch (the padding makes every host's slice equal)."""
    mesh = build_mesh(config.mesh, devices)
    schedule = learning_rate(config.optimizer)
    optimizer = make_optimizer(config.optimizer, config.model.scan_layers, schedule)
    padding = training_plan(config.data.global_batch_size, config.data.micro_batch_size,
                            data_parallel_size(mesh, config.mesh.rules), process_count)
    shardings, abstract_state = state_layout(config, optimizer, mesh)
    return TrainingSetup(config, mesh, optimizer, schedule, padding,
                         batch_sharding(mesh, config.mesh.rules), shardings, abstract_state,
                         make_train_step(config, optimizer, mesh, shardings))
