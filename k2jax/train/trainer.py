"""The training loop: resume or initialise, step, log, checkpoint, handle spikes and signals."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

import jax
import numpy as np

from k2jax.aot.xla_flags import compile_with_flags
from k2jax.checkpoint.manager import RunCheckpoints
from k2jax.checkpoint.params_io import restore_params
from k2jax.atomic_write import no_trace_if_refused
from k2jax.checkpoint.run_lock import run_dir_lock
from k2jax.checkpoint.set_aside import restore_newest_intact
from k2jax.config import Config, resolve_device_batch
from k2jax.data.loader import StepLoader
from k2jax.data.rollback import rollback_files, rollback_window
from k2jax.errors import UserError, one_line
from k2jax.model.param_count import count_params
from k2jax.progress import Progress, ProgressArg, format_duration
from k2jax.run_dir import SUPERSEDED_DIR, RunDir
from k2jax.train.data_span import ends_chunk, steps_from_data
from k2jax.train.flops import measure_matmul_peak, model_flops_per_step, peak_flops_for, \
    tokens_per_step
from k2jax.train.metrics import MetricsWriter
from k2jax.train.preemption import StopRequested
from k2jax.train.schedule import schedule_count
from k2jax.train.setup import build_training_setup
from k2jax.train.spikes import SpikeDetector


class Trainer:
    """`progress`: a k2jax.progress mode (a bar on a terminal, else one line per logged step).
    `stop`: the stop-signal handler, installed by the caller before anything slow (else `run`
    installs one)."""

    def __init__(self, config: Config, progress: ProgressArg = "auto",
                 stop: Optional[StopRequested] = None):
        # data.per_device_batch_size x every device of the mesh (all hosts): the global batch.
        config = resolve_device_batch(config, jax.device_count())
        self.config, self.progress, self.stop = config, progress, stop
        self._bar: Optional[Progress] = None
        self.run_dir = RunDir(config.train.run_dir)
        self.run_dir.ensure()
        self.primary = jax.process_index() == 0
        # The data first: train.steps is checked against it (or read from it: auto) before
        # any state is built. The run's order: its data_order.json (rollbacks) else the
        # config's moved windows.
        loader = StepLoader.for_run(self.run_dir, config)
        self.config = config = steps_from_data(config, loader, self.log)
        self.setup = build_training_setup(config, process_count=jax.process_count())
        self.mesh = self.setup.mesh
        self.learning_rate = self.setup.learning_rate  # the optimizer's: logs the step's lr
        self.checkpoints = RunCheckpoints(self.run_dir, config.train)
        self._checkpoints_closed = False
        self.lock = run_dir_lock(self.run_dir, enabled=False)  # held (process 0) while run() runs
        self.writer = MetricsWriter(self.run_dir, enabled=False)  # opened by run()
        self.detector = SpikeDetector(config.train.spikes)
        # Device batches are padded with zero-mask rows (k2jax/sharding/padding.py); the loss
        # and MFU count only the real rows.
        self.loader = loader.on_devices(self.setup.padding, self.setup.batch_sharding)

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
            from k2jax.weights.source import resolve_checkpoint

            # A run directory means its latest complete step, as for --checkpoint.
            source = resolve_checkpoint(train.init_from, self.log)
            params = restore_params(source, self.setup.abstract_state.params)
            self.log(f"initialised parameters from {source}"
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
        self.lock.check()  # a run that lost its gs:// lock must not write the run's files
        self.checkpoints.save(step, state, self.config.to_dict(), data)
        self.writer.flush()  # on gs:// the logs are otherwise flushed every few seconds

    # -- helpers -----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        if not self.primary:
            return
        if self._bar is not None and self._bar.mode == "bar":
            self._bar.write(f"[k2jax] {message}")  # above the bar, which stays whole
        else:
            print(f"[k2jax] {message}", file=sys.stderr, flush=True)

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

    def rollback(self, step: int, onset: int, good: Optional[int]):
        """Restore `good`, the last checkpoint at or before `onset` (where the trouble began),
        and move data to the end of the order (train.spikes.rollback_unit): what K2's team
        did by hand, automated. Checkpoints after `good` are set aside (the run writes them
        anew); with no checkpoint the run stays at `step` (its update was refused)."""
        resume = step if good is None else good
        unit = self.config.train.spikes.rollback_unit
        window = (rollback_files(self.loader, resume, onset) if unit == "file"
                  else rollback_window(self.loader, onset, unit))
        self.loader = self.loader.with_moved_window(window)
        if self.primary:
            self.run_dir.write_moved_row_ranges(self.loader.moved_row_ranges)
        for later in (s for s in self.checkpoints.all_steps() if s > resume):
            self.log(f"checkpoint {later} is after the rollback's step {resume}: set aside as "
                     f"{self.checkpoints.set_aside(later, SUPERSEDED_DIR)}")
        return window

    def last_good_checkpoint(self, onset: int) -> Optional[int]:
        self.checkpoints.wait()
        good = [s for s in self.checkpoints.all_steps() if s <= onset]
        return good[-1] if good else None

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        stop = self.stop or StopRequested()
        try:
            # one run per run_dir
            with run_dir_lock(self.run_dir, enabled=self.primary) as self.lock:
                try:
                    return self._run(stop)
                finally:
                    self._close_checkpoints()
        finally:
            if self.stop is None:
                stop.restore()

    def _close_checkpoints(self) -> None:
        """On every way out (a refused or failed restore, a stop during start-up, a full disk):
        Orbax's asynchronous work is waited for and its threads and event loops closed before
        the interpreter exits, which otherwise reports their leftovers as tracebacks after the
        one-line message ('Exception ignored in <coroutine ...>', 'Task exception was never
        retrieved')."""
        if self._checkpoints_closed:
            return
        self._checkpoints_closed = True
        try:
            self.checkpoints.wait()
        finally:
            self.checkpoints.close()

    def step_line(self, step: int, record: dict, seconds_per_step: float) -> str:
        """The grep-able line of a logged step (lines mode): key=value, one line."""
        eta = format_duration((self.config.train.steps - step) * seconds_per_step)
        return (f"step={step}/{self.config.train.steps} loss={record['loss']:.4f} "
                f"lr={record['lr']:.3e} grad_norm={record['grad_norm']:.4f} "
                f"tokens/s={record['tokens_per_s']:.0f} mfu={record['mfu']:.1%} "
                f"step_s={record['step_seconds']:.3f} eta={eta}")

    def _report(self, step: int, record: dict, since: tuple[float, int]) -> tuple[float, int]:
        """The bar's postfix; at logged steps the metrics and (lines mode) the step line, whose
        ETA takes the wall-clock pace (data, logging, saves included) since `since` = (time,
        step) of the previous line. Returns the new `since`."""
        self._bar.set_postfix_str(f"loss={record['loss']:.4f}, "
                                  f"tok_s={record['tokens_per_s']:.0f}, mfu={record['mfu']:.1%}")
        if step % self.config.train.log_every and step != self.config.train.steps:
            return since
        self.writer.record(step, record)
        if self._bar.mode == "lines":
            pace = (time.perf_counter() - since[0]) / max(step - since[1], 1)
            self.log(self.step_line(step, record, pace))
        return time.perf_counter(), step

    def _run(self, stop: StopRequested) -> int:
        cfg = self.config
        state, step = self.initial_state()
        if self.primary:  # only now: a refused resume must leave the run's config.yaml alone
            self.run_dir.write_config(cfg)
        self.writer = MetricsWriter(self.run_dir, enabled=self.primary)
        self.log(f"run dir {self.run_dir} | {count_params(cfg.model):,} parameters | mesh "
                 f"{dict(self.mesh.shape)} | {jax.device_count()} devices, "
                 f"{jax.process_count()} processes")
        self.log(f"TensorBoard: tensorboard --logdir {self.run_dir.tensorboard_dir}")
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

        tokens = tokens_per_step(cfg)
        model_flops = model_flops_per_step(cfg)
        peak = self.peak_flops() * jax.device_count()
        # Lines mode: the step line at each logged step is the progress (no timed lines).
        progress = self._bar = Progress("train", cfg.train.steps, unit="step", initial=step,
                                        every_s=None,
                                        progress=self.progress if self.primary else "none")
        metrics = None
        since = (time.perf_counter(), step)  # the ETA's pace: wall time since the last line
        stop.steps_started()  # from here a stop signal finishes and checkpoints the step
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
                    if spike != "trend" or next_step != step + 1:  # a trend's update counts
                        step = next_step
                        progress.set_position(step)
                        continue
                step += 1
                progress.update(1)
                record = {
                    "loss": metrics["loss"], "lr": lr,
                    "grad_norm": metrics["grad_norm"], "param_norm": metrics["param_norm"],
                    "update_ratio": metrics["update_ratio"],
                    "tokens_per_s": tokens / seconds, "step_seconds": seconds,
                    "mfu": model_flops / (seconds * peak), "tokens": metrics["tokens"],
                }
                since = self._report(step, record, since)
                if (step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
                        or (cfg.train.checkpoint_at_chunk_ends
                            and ends_chunk(self.loader, step - 1))):
                    self.save(step, state, metrics)
                if stop.agreed():  # every host stops at the same step
                    self.log(f"stop requested: checkpointing step {step} and exiting")
                    if step % cfg.train.checkpoint_every:
                        self.save(step, state, metrics)
                    break
        finally:
            progress.close()
            self._bar = None
            self._close_checkpoints()  # before the writer: a failed save is the error told
            self.writer.close()
        self.log(f"done at step {step}; checkpoints in {self.checkpoints.directory}")
        return 0

    def handle_spike(self, step: int, kind: str, metrics: dict, state) -> tuple[int, Any]:
        action = self.config.train.spikes.action
        onset = max(self.detector.onset(step, kind), self.config.data.first_step)
        event: dict[str, Any] = {"step": step, "kind": kind, "loss": metrics["loss"],
                                 "grad_norm": metrics["grad_norm"],
                                 "median": self.detector.median(), "action": action,
                                 "update_applied": bool(metrics["applied"]), "onset_step": onset}
        next_step = step + 1
        good = self.last_good_checkpoint(onset) if action == "rollback" else None
        if action == "rollback" and kind == "trend" and good is None:
            # A trend's updates were applied: only a checkpoint from before the rise undoes them.
            action = event["action"] = "log"
            event["note"] = f"no checkpoint at or before step {onset}, where the rise began"
        elif action == "skip" and kind == "trend":
            action = event["action"] = "log"  # its updates were applied; nothing to skip
        if action == "rollback":
            event["moved_rows"] = self.rollback(step, onset, good)
            if good is not None:
                state = self._restore(good)
                next_step = good
            else:
                next_step = step  # the update was refused, so the state is still the good one
                state = state.replace(step=state.step - 1)
            event["resumed_from_step"] = next_step
        self.writer.spike(event)
        self.writer.scalars(step, {"spike": 1.0, "spike_loss": metrics["loss"]
                                   if math.isfinite(metrics["loss"]) else -1.0})
        self.log(f"loss spike at step {step} ({kind}"
                 + (f" since step {onset}" if onset != step else "")
                 + f", loss {metrics['loss']:.4g}): {action}"
                 + (f", rows {event['moved_rows']} moved to the end, resuming at step "
                    f"{next_step}" if action == "rollback" else ""))
        if (action != "rollback" and kind != "trend"  # a trend's step is then logged as any
                and next_step % self.config.train.checkpoint_every == 0):
            # log/skip: the step counts as done (its update applied or refused in the step).
            self.save(next_step, state, metrics)
        return next_step, state


def train(config: Config, progress: ProgressArg = "auto",
          stop: Optional[StopRequested] = None) -> int:
    run_dir = RunDir(config.train.run_dir)
    # A refused start writes nothing: no empty run_dir, nor checkpoints/ in an existing one.
    with no_trace_if_refused(run_dir.path, run_dir.checkpoints_dir, run_dir.tensorboard_dir):
        return Trainer(config, progress, stop).run()
