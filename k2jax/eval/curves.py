"""Loss curves: a k2jax run (metrics.jsonl, or eval-loss JSON lines) against a reference CSV
exported from W&B, their differences on common steps, and an overlay plot.

Steps follow Megatron's iteration numbering, which is also what `k2jax train` writes to
metrics.jsonl: the loss logged at step i is that of batch i - 1 (0-based) with the weights after
i - 1 updates. eval-loss lines carry both; their `iteration` (= step + 1) is used when present.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from k2jax.atomic_write import atomic_file
from k2jax.errors import UserError
from k2jax.optional import require
from k2jax.run_dir import METRICS_FILE

STEP_COLUMNS = ("Step", "_step", "iteration", "step", "trainer/global_step")
LOSS_COLUMNS = ("lm loss", "train/lm_loss", "lm_loss", "loss", "train/loss")


@dataclasses.dataclass
class Curve:
    name: str
    steps: np.ndarray  # int64 [n], increasing
    losses: np.ndarray  # float64 [n]


def _curve(name: str, points: dict[int, float]) -> Curve:
    if not points:
        raise UserError(f"{name}: no (step, loss) points found")
    steps = np.array(sorted(points), np.int64)
    return Curve(name, steps, np.array([points[s] for s in steps], np.float64))


def read_run(path: str) -> Curve:
    """RUN_DIR (its metrics.jsonl) or a .jsonl file; a later line for a step wins (a resumed
    or rolled-back run logs some steps again)."""
    file = Path(path)
    if file.is_dir():
        file = file / METRICS_FILE
    if not file.is_file():
        raise UserError(f"run {path}: no such run directory with metrics.jsonl, nor .jsonl file")
    points: dict[int, float] = {}
    with _text_file(file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.get("iteration", record["step"]))
                loss = record.get("loss")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                raise UserError(f"{file}:{number}: expected a JSON object with 'step' and 'loss'")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                points[step] = float(loss)
    return _curve(str(file), points)


@contextlib.contextmanager
def _text_file(path):
    """Yields the file open as UTF-8 text (newline="" as csv needs); bytes that are not UTF-8
    (a binary file given by mistake) are one line naming it."""
    with open(path, newline="", encoding="utf-8") as f:
        try:
            yield f
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not a UTF-8 text file ({err.reason})") from None


def _pick(header: list[str], given: Optional[str], candidates: tuple[str, ...], what: str,
          flag: str, path: str) -> str:
    if given is not None:
        if given not in header:
            raise UserError(f"{path}: no column {given!r} ({flag}); columns: {', '.join(header)}")
        return given
    # W&B panel exports name columns "<run> - lm loss" with "__MIN"/"__MAX" siblings.
    usable = [c for c in header if not c.endswith(("__MIN", "__MAX"))]
    for candidate in candidates:
        matches = [c for c in usable if c == candidate or c.endswith(f" - {candidate}")]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserError(f"{path}: several {what} columns ({', '.join(matches)}); choose one "
                            f"with {flag}")
    raise UserError(f"{path}: no {what} column (looked for {', '.join(candidates)}); columns: "
                    f"{', '.join(header)}; choose one with {flag}")


def read_reference_csv(path: str, step_column: Optional[str] = None,
                       loss_column: Optional[str] = None) -> Curve:
    """A W&B CSV export. Rows with an empty loss cell (a step that logged other metrics) are
    skipped; any other unreadable step or loss is a UserError naming file:line, so a damaged
    export is never compared with rows silently missing."""
    if Path(path).is_dir():
        raise UserError(f"reference {path}: is a directory, expected a CSV file")
    if not Path(path).is_file():
        raise UserError(f"reference {path}: no such file")
    with _text_file(path) as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        if not header:
            raise UserError(f"{path}: empty CSV (no header)")
        step_name = _pick(header, step_column, STEP_COLUMNS, "step", "step_column", path)
        loss_name = _pick(header, loss_column, LOSS_COLUMNS, "loss", "loss_column", path)
        points: dict[int, float] = {}
        for row in reader:
            step_text, loss_text = row[step_name], row[loss_name]
            if loss_text is None or step_text is None:  # fewer cells than the header
                raise UserError(f"{path}:{reader.line_num}: fewer cells than the header's "
                                f"{len(header)}")
            if not loss_text.strip():
                continue
            try:
                step, loss = _whole_number(step_text), float(loss_text)
            except ValueError:
                raise UserError(f"{path}:{reader.line_num}: expected a step (whole number) in "
                                f"column {step_name!r} and a loss in {loss_name!r}, got "
                                f"{step_text!r}, {loss_text!r}") from None
            if math.isfinite(loss):
                points[step] = loss
    return _curve(f"{path} [{loss_name}]", points)


def _whole_number(text: str) -> int:
    """'1200' or '1200.0' (W&B writes steps either way) -> 1200; ValueError otherwise."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def restrict(curve: Curve, start: Optional[int], stop: Optional[int]) -> Curve:
    keep = np.ones(len(curve.steps), bool)
    if start is not None:
        keep &= curve.steps >= start
    if stop is not None:
        keep &= curve.steps < stop
    return Curve(curve.name, curve.steps[keep], curve.losses[keep])


def differences(run: Curve, reference: Curve, threshold: float) -> dict:
    """Run minus reference on common steps: mean/max abs difference and the steps beyond
    `threshold` (absolute, in loss units)."""
    common, run_index, ref_index = np.intersect1d(run.steps, reference.steps,
                                                  return_indices=True)
    if not len(common):
        raise UserError(f"no common steps: run has {_span(run)}, reference has {_span(reference)}")
    diff = run.losses[run_index] - reference.losses[ref_index]
    worst = int(np.argmax(np.abs(diff)))
    parted = np.flatnonzero(np.abs(diff) > threshold)
    return {"common_steps": int(len(common)), "mean_abs_diff": float(np.mean(np.abs(diff))),
            "mean_diff": float(np.mean(diff)), "max_abs_diff": float(np.abs(diff[worst])),
            "max_abs_diff_step": int(common[worst]), "threshold": threshold,
            "parted": [{"step": int(common[i]), "run": float(run.losses[run_index[i]]),
                        "reference": float(reference.losses[ref_index[i]]),
                        "diff": float(diff[i])} for i in parted]}


def _span(curve: Curve) -> str:
    if not len(curve.steps):
        return "no points in range"
    return f"{len(curve.steps)} points in steps [{curve.steps[0]}, {curve.steps[-1]}]"


def plot_curves(run: Curve, reference: Curve, out: str, threshold: float) -> None:
    """Overlay (top) and run - reference on common steps (bottom), written atomically as PNG."""
    matplotlib = require("matplotlib", "compare-curves --out (the PNG)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise UserError(f"out {out}: directory {out_path.parent} does not exist")
    few = max(len(run.steps), len(reference.steps)) <= 50
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot(reference.steps, reference.losses, "-o" if few else "-", ms=3, lw=1,
             label=f"reference: {reference.name}")
    top.plot(run.steps, run.losses, "-s" if few else "-", ms=3, lw=1, label=f"run: {run.name}")
    top.set_ylabel("loss")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    common, ri, fi = np.intersect1d(run.steps, reference.steps, return_indices=True)
    bottom.plot(common, run.losses[ri] - reference.losses[fi], ".", ms=3)
    for y in (-threshold, threshold):
        bottom.axhline(y, color="red", lw=0.7, ls="--")
    bottom.set_xlabel("step (iteration)")
    bottom.set_ylabel("run - reference")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_file(out_path, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
