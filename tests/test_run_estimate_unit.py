"""k2jax/aot/run_estimate.py: the band `k2jax aot` prints and puts in --json is the recorded
calibration's (k2jax/aot/calibration.py), and the run's days and chip-hours follow from it."""

import pytest

from k2jax.aot.calibration import ERRORS, error_summary
from k2jax.aot.run_estimate import (band_fields, format_lines, run_fields, run_steps,
                                    three_figures)


def test_the_band_is_derived_from_the_recorded_errors():
    fields = band_fields(20.0, 0.60)
    low, high = fields["predicted_step_band_seconds"]
    assert (low, high) == pytest.approx((20.0 * (1 + min(ERRORS.values())),
                                         20.0 * (1 + max(ERRORS.values()))))
    assert fields["calibrated_step_seconds_range"] == [low, high]
    mfu_low, mfu_high = fields["predicted_mfu_band"]
    assert mfu_low == pytest.approx(0.60 * 20.0 / high) and mfu_high == pytest.approx(0.60 * 20.0 / low)
    summary = error_summary()
    assert fields["calibration"]["cases"] == summary["cases"] == len(ERRORS)
    line = fields["calibration_line"]
    assert f"calibrated step {three_figures(low)}-{three_figures(high)} s" in line
    assert f"mean {summary['mean']:+.1%}, worst {summary['worst']:+.1%}" in line


def test_days_and_chip_hours_of_the_run():
    assert run_steps(338760, 0) == 338760 and run_steps(1000, 400) == 600
    assert run_steps("auto", 0) is None and run_fields(None, 20.0, [19.0, 21.0], 256) == {}
    run = run_fields(338760, 22.66, [21.2, 23.8], 256)
    assert run["run_days"] == pytest.approx(338760 * 22.66 / 86400)  # 88.8 days
    assert run["run_chip_hours"] == pytest.approx(338760 * 22.66 * 256 / 3600)
    assert run["run_days_band"][0] < run["run_days"] < run["run_days_band"][1]
    report = {"chips": 256, **band_fields(22.66, 0.625), **run}
    text = "\n".join(format_lines(report))
    assert "run of 338,760 steps" in text and "88.8 days" in text and "calibrated step" in text


def test_a_generation_with_cases_of_its_own_gets_their_band():
    from k2jax.aot.calibration import errors_for

    v6e = errors_for("v6e")
    assert v6e and len(v6e) < len(errors_for())  # v6e's cases only
    fields = band_fields(10.0, 0.5, "v6e")
    assert fields["predicted_step_band_seconds"] == [10.0 * (1 + min(v6e.values())),
                                                     10.0 * (1 + max(v6e.values()))]
    assert f"{len(v6e)} published MaxText runs on v6e" in fields["calibration_line"]
    assert band_fields(10.0, 0.5, "v4")["calibration"]["cases"] == len(errors_for())  # none: all


def test_band_figures_keep_three_significant_figures_with_their_zeros():
    assert [three_figures(x) for x in (24.0, 21.14, 0.01234, 123.4, 5.0)] == [
        "24.0", "21.1", "0.0123", "123", "5.00"]
    line = band_fields(23.18 / (1 + max(ERRORS.values())), 0.6)["calibration_line"]
    assert f"-{three_figures(23.18)} s" in line
