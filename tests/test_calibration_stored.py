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


@pytest.mark.slow
def test_every_stored_program_is_what_its_case_compiles_to_today(monkeypatch):
    """The stored programs stand for compiles (a calibration run keeps them instead of
    compiling): each must have been compiled from what its case lowers to today. A change of
    k2jax's model code or of a case that alters a case's program fails here, naming the cases
    to recompile; programs of another compiler are never kept."""
    from k2jax.aot.program_key import kept_program, read_keys, toolchain

    calibrate = calibration_module()
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "")
    calibrate.set_startup_flags()  # as a run sets them
    stale = []
    for case in calibrate.CASES:
        layers = max(2, case.min_compile_layers)
        key = calibrate.case_program_key(case, layers)
        if kept_program(calibrate.STORED_HLO, calibrate.hlo_name(case, layers), key) is None:
            stale.append(case.name)
    recorded = read_keys(calibrate.STORED_HLO)
    assert len(recorded) == len(calibrate.CASES)
    if {entry["toolchain"] for entry in recorded.values()} == {toolchain()}:
        assert stale == [], (f"stored programs no longer what these cases compile to: "
                             f"python benchmarks/calibrate_step_model.py --cases "
                             f"{','.join(stale)} --hlo-dir DIR --update-stored "
                             f"(benchmarks/calibration_hlo/README.md)")
    else:
        assert len(stale) == len(calibrate.CASES)
