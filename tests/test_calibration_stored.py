"""The step-time model's recorded calibration (k2jax/aot/calibration.py ERRORS, the band `k2jax
aot` prints) is what the model gives today on the cases' compiled programs, kept in
benchmarks/calibration_hlo: a change of the model that moves a case must update the record and
docs/performance.md with it (`python benchmarks/calibrate_step_model.py --stored`)."""

from __future__ import annotations

import pytest

from calibration_script import calibration_module
from k2jax.aot.calibration import ERRORS


def test_every_recorded_error_is_the_model_on_its_stored_program():
    calibrate = calibration_module()
    assert {case.name for case in calibrate.CASES} == set(ERRORS)
    for case in calibrate.CASES:
        row = calibrate.run_case(case, max(2, case.min_compile_layers), calibrate.STORED_HLO,
                                 reuse=True)
        assert "error" not in row, row
        assert row["relative_error"] == pytest.approx(ERRORS[case.name], abs=5e-4), case.name
