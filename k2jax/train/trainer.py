"""The training loop: resume or initialise, step, log, checkpoint, handle spikes and signals."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import yaml
from tqdm import tqdm

from k2jax.aot.xla_flags import compile_with_flags
from k2jax.checkpoint.manager import RunCheckpoints
from k2jax.checkpoint.params_io import restore_params
from k2jax.checkpoint.run_lock import RunDirLock, ensure_run_dir
from k2jax.checkpoint.set_aside import SUPERSEDED_DIR, restore_newest_intact
from k2jax.config import Config
from k2jax.atomic_write import write_bytes_atomic
from k2jax.data.loader import StepLoader
from k2jax.data.rollback import rollback_window
from k2jax.data.run_order import run_moved_row_ranges, write_moved_row_ranges
from k2jax.errors import UserError, one_line
from k2jax.model.param_count import count_params
from k2jax.paths import storage_path
from k2jax.train.flops import flops_per_token, measure_matmul_peak, peak_flops_for
from k2jax.train.metrics import MetricsWriter
from k2jax.train.preemption import StopRequested
from k2jax.train.schedule import learning_rate, schedule_count
from k2jax.train.setup import build_training_setup
from k2jax.train.spikes import SpikeDetector


class Trainer:
    def __init__(self, config: Config):
        self.config = config
        self.run_dir = storage_path(config.train.run_dir)
        ensure_run_dir(self.run_dir)
        self.primary = jax.process_index() == 0
        self.setup = build_training_setup(config, process_count=jax.process_count())
        self.mesh = self.setup.mesh
        self.learning_rate = learning_rate(config.optimizer)  # for the logs: the step's lr
        self.checkpoints = RunCheckpoints(str(self.run_dir), config.train)
        self.detector = SpikeDetector(config.train.spikes)
        # The run's order: its data_order.json (rollbacks) else the config's moved windows.
        # Device batches are padded with zero-mask rows (k2jax/sharding/padding.py); the loss
        # and MFU count only the real rows.
        self.loader = StepLoader.from_config(
            config, moved_row_ranges=run_moved_row_ranges(self.run_dir, config),
            padding=self.setup.padding, process_index=jax.process_index(),
            process_count=jax.process_count(), sharding=self.setup.batch_sharding)

    # -- state -------------------------------------------------------------------------------

    def _restore(self, step: int):
        self.checkpoints.check_compatible(step, self.config.to_dict())
        state = self.checkpoints.restore_state(step, self.setup.abstract_state)
        _, data = self.checkpoints.read_json(step)
        self.detector.restore(data.get("spike_history", []))
        return state

    def initial_state(self):
        """(state, step): resume_step, else the latest checkpoint, else init_from (at
        train.start_step), else fresh."""
        train = self.config.train
        steps = self.checkpoints.all_steps()
        if train.resume_step is not None:
            if train.resume_step not in steps:
                raise UserError(f"train.resume_step={train.resume_step}: no such checkpoint in "
                                f"{self.checkpoints.directory} (have {steps})")
            try:
                state = self._restore(train.resume_step)
            except UserError:
                raise
            except Exception as err:  # asked for by name: refuse, move nothing
                raise UserError(f"train.resume_step={train.resume_step}: checkpoint "
                                f"{self.checkpoints.directory / str(train.resume_step)} cannot "
                                f"be restored ({one_line(err)})") from err
            self.log(f"resumed from step {train.resume_step} (train.resume_step)")
            for later in (s for s in steps if s > train.resume_step):  # to be written anew
                self.log(f"checkpoint {later} is newer than train.resume_step: set aside as "
                         f"{self.checkpoints.set_aside(later, SUPERSEDED_DIR)}")
            return state, train.resume_step
        restored = restore_newest_intact(self.checkpoints, steps, self._restore, self.log)
        if restored is not None:
            self.log(f"resumed from step {restored[1]} ({self.checkpoints.directory})")
            return restored
        if train.init_from:
            params = restore_params(train.init_from, self.setup.abstract_state.params)
            self.log(f"initialised parameters from {train.init_from}"
                     + (f"; continuing at step {train.start_step} with fresh AdamW moments"
                        if train.start_step else ""))
            return self.setup.init_state(params, train.start_step), train.start_step
        return self.setup.init_state(), 0

    def save(self, step: int, state, metrics: Optional[dict]) -> None:
        if metrics is not None and not math.isfinite(metrics["param_norm"]):
            self.log(f"step {step}: parameters are not finite; checkpoint NOT saved")
            return
        # The data position is the step; the moved windows live in data_order.json only.
        data = {"step": step, "spike_history": self.detector.state()}
        self.checkpoints.save(step, state, self.config.to_dict(), data)

    # -- helpers -----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.primary:
            tqdm.write(f"[k2jax] {message}", file=sys.stderr)

    @staticmethod
    def _schedule_step(state) -> int:
        count = schedule_count(state.opt_state)  # replicated: any local shard holds it
        return int(np.asarray(count.addressable_data(0)))

    def peak_flops(self) -> float:
        if self.config.train.peak_flops_per_device:
            return self.config.train.peak_flops_per_device
        known = peak_flops_for(jax.devices()[0])
        if known:
            return known
        self.log("measuring this device's matmul peak for MFU (set "
                 "train.peak_flops_per_device to skip)")
        return measure_matmul_peak()

    def rollback(self, step: int):
        """Move the rest of the spiking step's chunk (or its rows: train.spikes.rollback_unit)
        to the end of the order and restore the last good checkpoint at or before `step` (what
        K2's team did by hand, automated)."""
        window = rollback_window(self.loader, step, self.config.train.spikes.rollback_unit)
        self.loader = self.loader.with_moved_window(window)
        if self.primary:
            write_moved_row_ranges(self.run_dir, self.loader.moved_row_ranges)
        self.checkpoints.wait()
        good = [s for s in self.checkpoints.all_steps() if s <= step]
        return window, (good[-1] if good else None)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        with RunDirLock(self.run_dir, enabled=self.primary):  # one run per run_dir
            return self._run()

    def _run(self) -> int:
        cfg = self.config
        state, step = self.initial_state()
        if self.primary:  # only now: a refused resume must leave the run's config.yaml alone
            write_bytes_atomic(self.run_dir / "config.yaml",
                               yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        self.writer = MetricsWriter(str(self.run_dir), enabled=self.primary)
        self.log(f"run dir {self.run_dir} | {count_params(cfg.model):,} parameters | mesh "
                 f"{dict(self.mesh.shape)} | {jax.device_count()} devices, "
                 f"{jax.process_count()} processes")
        self.log(f"TensorBoard: tensorboard --logdir {self.run_dir / 'tensorboard'}")
        if step >= cfg.train.steps:
            self.log(f"nothing to do: checkpoint at step {step} >= train.steps={cfg.train.steps}")
            return 0

        batches = self.loader.iter_from_step(step, cfg.train.steps)  # reads ahead while compiling
        start = time.perf_counter()
        lowered = self.setup.lower()  # from shapes: step `step` is read once, below
        compiled = (compile_with_flags(lowered, cfg.train.xla_flags)
                    if jax.default_backend() == "tpu" else lowered.compile())
        compile_seconds = time.perf_counter() - start
        self.log(f"compiled the train step in {compile_seconds:.1f} s")
        self.writer.scalars(step, {"compile_seconds": compile_seconds})

        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
        peak = self.peak_flops() * jax.device_count()
        stop = StopRequested()
        progress = tqdm(total=cfg.train.steps, initial=step, disable=not self.primary,
                        unit="step", dynamic_ncols=True)
        metrics = None
        try:
            while step < cfg.train.steps:
                batch_step, batch = next(batches)
                assert batch_step == step, (batch_step, step)
                # The lr this update uses: the schedule's counter, which a skipped update does
                # not advance and train.start_step starts at the global step.
                lr = float(self.learning_rate(self._schedule_step(state)))
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch, np.float32(self.detector.loss_ceiling()))
                metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
                seconds = time.perf_counter() - t0
                spike = self.detector.check(metrics["loss"], metrics["grad_norm"],
                                            metrics["update_norm"])
                if spike:
                    next_step, state = self.handle_spike(step, spike, metrics, state)
                    if next_step != step + 1:  # rolled back: the order and position changed
                        batches = self.loader.iter_from_step(next_step, cfg.train.steps)
                    step = progress.n = next_step
                    progress.refresh()
                    continue
                step += 1
                progress.update(1)
                record = {
                    "loss": metrics["loss"], "lr": lr,
                    "grad_norm": metrics["grad_norm"], "param_norm": metrics["param_norm"],
                    "update_ratio": metrics["update_ratio"],
                    "tokens_per_s": tokens_per_step / seconds, "step_seconds": seconds,
                    "mfu": model_flops / (seconds * peak), "tokens": metrics["tokens"],
                }
                progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                     tok_s=f"{record['tokens_per_s']:.0f}",
                                     mfu=f"{record['mfu']:.1%}")
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    self.writer.record(step, record)
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                    self.save(step, state, metrics)
                if stop.agreed():  # every host stops at the same step
                    self.log(f"stop requested: checkpointing step {step} and exiting")
                    if step % cfg.train.checkpoint_every:
                        self.save(step, state, metrics)
                    break
        finally:
            progress.close()
            stop.restore()
            self.checkpoints.wait()
            self.checkpoints.close()
            self.writer.close()
        self.log(f"done at step {step}; checkpoints in {self.checkpoints.directory}")
        return 0

    def handle_spike(self, step: int, kind: str, metrics: dict, state) -> tuple[int, Any]:
        action = self.config.train.spikes.action
        event: dict[str, Any] = {"step": step, "kind": kind, "loss": metrics["loss"],
                                 "grad_norm": metrics["grad_norm"],
                                 "median": self.detector.median(), "action": action,
                                 "update_applied": bool(metrics["applied"])}
        next_step = step + 1
        if action == "rollback":
            window, good = self.rollback(step)
            event["moved_rows"] = window
            if good is not None:
                state = self._restore(good)
                next_step = good
            else:
                next_step = step  # the update was refused, so the state is still the good one
                state = state.replace(step=state.step - 1)
            event["resumed_from_step"] = next_step
        self.writer.append_jsonl("spikes.jsonl", event)
        self.writer.scalars(step, {"spike": 1.0, "spike_loss": metrics["loss"]
                                   if math.isfinite(metrics["loss"]) else -1.0})
        self.log(f"loss spike at step {step} ({kind}, loss {metrics['loss']:.4g}): {action}"
                 + (f", rows {event['moved_rows']} moved to the end, resuming at step "
                    f"{next_step}" if action == "rollback" else ""))
        if action != "rollback" and next_step % self.config.train.checkpoint_every == 0:
            # log/skip: the step counts as done (its update applied or refused in the step).
            self.save(next_step, state, metrics)
        return next_step, state


def train(config: Config) -> int:
    return Trainer(config).run()
