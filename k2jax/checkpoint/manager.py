"""Training checkpoints under `run_dir/checkpoints/<step>/` with three items:
  state   the TrainState (step, params, optimizer state), each host writing its own shards
  config  the resolved config, so a resume can refuse an incompatible one
  data    the data position (the step) and the spike detector's history; the windows that
          rollbacks moved live in run_dir/data_order.json only (k2jax/run_dir.py)

Orbax commits a step only when every item is written, so a run killed mid-save leaves the
previous step as the latest complete one: on a local disk the step is written under a temporary
name and renamed at the end; on gs:// (no rename) it is written in place and the object
`<step>/commit_success.txt` is written last, and a step without it is not listed
(tests/test_gcs_run_dir.py kills a save mid-way to check).
"""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from k2jax.checkpoint.set_aside import set_aside_step
from k2jax.config import TrainConfig
from k2jax.errors import UserError
from k2jax.run_dir import DAMAGED_DIR, RunDir

# Keys that must match to resume: they fix parameter shapes or the meaning of a data position.
RESUME_KEYS = {
    "model": ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "tie_word_embeddings", "scan_layers", "param_dtype",
              "rope_theta"),  # the trained weights encode positions at this base
    "data": ("seq_len", "global_batch_size", "order", "start_row", "source"),
    "train": ("seed",),
}


def incompatible_keys(saved: dict, current: dict) -> list[str]:
    differing = []
    for section, keys in RESUME_KEYS.items():
        for key in keys:
            old, new = saved.get(section, {}).get(key), current.get(section, {}).get(key)
            if old != new:
                differing.append(f"{section}.{key} (checkpoint {old!r}, now {new!r})")
    return differing


class RunCheckpoints:
    def __init__(self, run_dir: RunDir | str, train: TrainConfig):
        run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=train.keep_checkpoints, keep_period=train.keep_period,
            enable_async_checkpointing=train.async_checkpoint, create=True)
        self.run_dir = run_dir
        self.directory = run_dir.checkpoints_dir
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config", "data"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, config: dict, data: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
            data=ocp.args.JsonSave(data)), force=True)

    def read_json(self, step: int) -> tuple[dict, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        return restored["config"], restored["data"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def check_compatible(self, step: int, current_config: dict) -> None:
        saved, _ = self.read_json(step)
        differing = incompatible_keys(saved, current_config)
        if differing:
            raise UserError(f"checkpoint {self.directory / str(step)} was made with a different "
                            f"config: {'; '.join(differing)}")

    def set_aside(self, step: int, folder: str = DAMAGED_DIR) -> str:
        """Moves a step out of Orbax's way into run_dir/<folder> (process 0 renames, every
        process waits and forgets the step); returns where it went."""
        import jax
        from jax.experimental import multihost_utils

        target = ""
        if jax.process_index() == 0:
            target = str(set_aside_step(self.directory, step,
                                        self.run_dir.set_aside_dir(folder)))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"k2jax set aside checkpoint {step}")
        self.manager.reload()
        return target or str(self.run_dir.set_aside_dir(folder))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
