"""k2jax/aot/calibration.py: the band the recorded calibration errors put around a prediction."""

import pytest

from k2jax.aot.calibration import ERRORS, error_summary, errors_for, step_band
from k2jax.aot.run_estimate import calibration_line, three_figures


def test_band_is_the_prediction_scaled_by_the_extreme_errors():
    errors = {"a": -0.05, "b": 0.10, "c": 0.01}
    assert step_band(20.0, errors) == pytest.approx((19.0, 22.0))
    s = error_summary(errors)
    assert s["mean"] == pytest.approx(0.02) and s["worst"] == 0.10 and s["cases"] == 3


def test_the_printed_line_names_the_recorded_calibration():
    low, high = step_band(21.0)
    line = calibration_line(21.0, 0.6)
    assert f"{three_figures(low)}-{three_figures(high)} s" in line
    assert f"{len(ERRORS)} published" in line
    assert low <= high


def test_a_generation_with_cases_gets_its_own_band():
    errors = {"32b-v5p-128": -0.06, "32b-2xv5p-128": -0.02, "llama3.1-8b-v6e-8": 0.2}
    assert set(errors_for("v5p", errors)) == {"32b-v5p-128", "32b-2xv5p-128"}
    assert step_band(10.0, errors, "v6e") == pytest.approx((12.0, 12.0))
    assert errors_for("v4", errors) == errors  # no case there: all of them
    assert "on v6e" in calibration_line(10.0, 0.4, "v6e")
