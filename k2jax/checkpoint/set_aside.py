"""Damaged checkpoints are set aside, never deleted and never left in the way.

A step directory that fails to restore (a truncated or missing shard, garbage metadata, a
deleted `state/`) is renamed to `run_dir/damaged_checkpoints/<step>[-N]`: out of Orbax's sight,
so the run falls back to the previous step and can save that step number again later, and still
on disk for a human to inspect. Left in place, it made every retry retrain up to it and then die
on Orbax's "step already exists".

On gs:// there is no rename of a directory: the step's objects are copied to the new name, then
deleted, Orbax's commit marker (`commit_success.txt`, what makes a step complete on GCS) first.
Killed part-way, the step either is still whole under checkpoints/ or has lost its marker there,
and Orbax takes neither a step without a marker nor anything under <folder>/ for a checkpoint;
the copy may then be incomplete (it is only kept for inspection).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from etils import epath

from k2jax.errors import UserError
from k2jax.storage import is_remote, remote
from k2jax.storage_errors import recover_from

COMMIT_MARKER = "commit_success.txt"  # Orbax's CommitFileTemporaryPath, used on GCS


def set_aside_step(checkpoints_dir: epath.Path, step: int, target_dir: epath.Path
                   ) -> epath.Path:
    """Moves `checkpoints_dir/<step>` to a free name under `target_dir` (<step>, <step>-1, ...;
    earlier copies of the same step there keep their names); returns the new path."""
    on_gcs = is_remote(checkpoints_dir)
    if not on_gcs:
        target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / str(step)
    copy = 1
    while target.exists():
        target = target_dir / f"{step}-{copy}"
        copy += 1
    source = checkpoints_dir / str(step)
    if on_gcs:
        remote.copy_tree(str(source), str(target))
        remote.remove_tree(str(source), first=COMMIT_MARKER)
    else:
        source.rename(target)
    return target


def restore_newest_intact(checkpoints, steps: list[int], restore: Callable[[int], Any],
                          log: Callable[[str], None]) -> Optional[tuple[Any, int]]:
    """(restore(step), step) for the newest step that restores, None when `steps` is empty.

    The newer, damaged steps are set aside only once an older one has restored: if none does,
    the cause is more likely the code or the config than the files, so nothing is moved and the
    run stops with one line. A UserError (an incompatible config) is never taken for damage.
    """
    damaged = []
    for step in reversed(steps):
        state, failure = recover_from(lambda: restore(step))  # any failure to read is damage
        if failure is not None:
            log(f"checkpoint {step} failed to restore ({failure}); trying the previous one")
            damaged.append((step, failure))
            continue
        for bad, _ in damaged:
            log(f"checkpoint {bad} set aside as {checkpoints.set_aside(bad)}")
        return state, step
    if damaged:
        step, failure = damaged[0]
        raise UserError(f"no checkpoint in {checkpoints.directory} restores (step {step}: "
                        f"{failure}); move them away to start afresh")
    return None
