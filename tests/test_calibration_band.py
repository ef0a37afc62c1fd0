"""k2jax/aot/calibration.py: the band the recorded calibration errors put around a prediction."""

import pytest

from k2jax.aot.calibration import ERRORS, band_line, error_summary, step_band


def test_band_is_the_prediction_scaled_by_the_extreme_errors():
    errors = {"a": -0.05, "b": 0.10, "c": 0.01}
    assert step_band(20.0, errors) == pytest.approx((19.0, 22.0))
    s = error_summary(errors)
    assert s["mean"] == pytest.approx(0.02) and s["worst"] == 0.10 and s["cases"] == 3


def test_the_printed_line_names_the_recorded_calibration():
    low, high = step_band(21.0)
    line = band_line(21.0)
    assert f"{low:.2f}-{high:.2f} s" in line and f"{len(ERRORS)} published" in line
    assert low <= high
