"""What a predicted step means for a run: the calibration band around it (from the recorded
errors of k2jax/aot/calibration.py, never from numbers copied here), the MFU across that band,
and the days and chip-hours of the config's run (train.steps - train.start_step steps).

A rerun of the calibration changes `calibration.ERRORS`, and with it every band printed here.
"""

from __future__ import annotations

import math
from typing import Optional

from k2jax.aot.calibration import CALIBRATED_ON, error_summary, errors_for, step_band

SECONDS_PER_DAY = 86400.0


def band_fields(predicted_step: float, predicted_mfu: float,
                generation: Optional[str] = None) -> dict:
    """--json keys of the calibration band: the step range a published run of this program
    would be expected in, the MFU range that implies, and the calibration it rests on. The
    band is that of the cases run on `generation` where there are any (the v6e cases miss in
    another direction than the v5p/v5e ones: docs/performance.md), else of all of them."""
    low, high = step_band(predicted_step, generation=generation)
    summary = error_summary(errors_for(generation))
    return {
        "predicted_step_band_seconds": [low, high],
        "calibrated_step_seconds_range": [low, high],  # the older name of the same band
        # A longer step is a lower MFU: the band's high step gives its low MFU.
        "predicted_mfu_band": [predicted_mfu * predicted_step / high,
                               predicted_mfu * predicted_step / low],
        "calibration": {**summary, "calibrated_on": CALIBRATED_ON},
        "calibration_line": calibration_line(predicted_step, predicted_mfu, generation),
    }


def calibration_line(predicted_step: float, predicted_mfu: float,
                     generation: Optional[str] = None) -> str:
    """'calibrated step 21.2-23.8 s, MFU between 59.5% and 66.7% (the model against N
    published MaxText runs: mean, worst, spread; ...)': three significant figures, so a small
    plan's band shows, with their trailing zeros ("21.1-24.0 s", not "21.1-24 s")."""
    low, high = step_band(predicted_step, generation=generation)
    s = error_summary(errors_for(generation))
    where = f" on {generation}" if generation and len(errors_for(generation)) < len(
        errors_for()) else ""
    return (f"calibrated step {three_figures(low)}-{three_figures(high)} s, MFU between "
            f"{predicted_mfu * predicted_step / high:.1%} and "
            f"{predicted_mfu * predicted_step / low:.1%} (the model against {s['cases']} "
            f"published MaxText runs{where}: mean {s['mean']:+.1%}, worst {s['worst']:+.1%}, spread "
            f"{s['spread']:.1%}; calibrated {CALIBRATED_ON}; docs/performance.md)")


def three_figures(x: float) -> str:
    """A number (seconds, days) to three significant figures, zeros kept: 24.0, 0.0123, 123."""
    decimals = max(0, 2 - math.floor(math.log10(x))) if x > 0 else 2
    return f"{x:.{decimals}f}"


def run_steps(steps, start_step: int) -> Optional[int]:
    """Steps the config's run takes (train.steps may be `auto`, known only from the data)."""
    return steps - start_step if isinstance(steps, int) and steps > start_step else None


def run_fields(steps: Optional[int], predicted_step: float, band: list[float],
               chips: int) -> dict:
    """--json keys of the whole run at the predicted step and across its band (empty when the
    run's length is not known here)."""
    if steps is None:
        return {}
    days = lambda step: steps * step / SECONDS_PER_DAY
    chip_hours = lambda step: steps * step * chips / 3600.0
    return {"run_steps": steps, "run_days": days(predicted_step),
            "run_days_band": [days(band[0]), days(band[1])],
            "run_chip_hours": chip_hours(predicted_step),
            "run_chip_hours_band": [chip_hours(band[0]), chip_hours(band[1])]}


def format_lines(report: dict) -> list[str]:
    """The report's band and run lines (text output of `k2jax aot`)."""
    lines = []
    if report.get("calibration_line"):
        lines.append(report["calibration_line"])
    if report.get("run_steps"):
        d_low, d_high = report["run_days_band"]
        h_low, h_high = report["run_chip_hours_band"]
        lines.append(f"run of {report['run_steps']:,} steps (train.steps - train.start_step) on "
                     f"{report['chips']} chips: {_amount(report['run_days'])} days "
                     f"({_amount(d_low)}-{_amount(d_high)} across the band), "
                     f"{_amount(report['run_chip_hours'])} chip-hours ({_amount(h_low)}-"
                     f"{_amount(h_high)})")
    return lines


def _amount(x: float) -> str:
    """88.8, 94.0, 545,870, 0.0123: three significant figures, thousands grouped."""
    return f"{x:,.0f}" if x >= 1000 else three_figures(x)
