"""A calibration run compiles a case once and keeps its program until what the case compiles
to changes (benchmarks/calibrate_step_model.py, k2jax/aot/program_key.py)."""

from __future__ import annotations

import dataclasses

import pytest

from calibration_script import calibration_module


@pytest.mark.slow
def test_a_case_compiles_once_then_is_kept_until_its_program_changes(tmp_path, monkeypatch):
    calibrate = calibration_module()
    stored = tmp_path / "stored"  # the repository's folder, here a scratch one
    stored.mkdir()
    monkeypatch.setattr(calibrate, "STORED_HLO", str(stored))
    case = dataclasses.replace(calibrate.EXTRAPOLATION_CHECK,
                               model={**calibrate.EXTRAPOLATION_CHECK.model, "layers": 4})
    first = calibrate.compile_or_keep(case, 2, str(tmp_path / "run1"), update_stored=True)
    assert "error" not in first and first["kept"] is None
    assert (stored / "calibrate-check-1b-v5p-8-2l.hlo.xz").exists()

    again = calibrate.compile_or_keep(case, 2, str(tmp_path / "run2"))  # a fresh clone's run
    assert again["kept"] == str(stored / "calibrate-check-1b-v5p-8-2l.hlo.xz")
    assert again["predicted_step_seconds"] == first["predicted_step_seconds"]
    assert not (tmp_path / "run2").exists()  # nothing compiled

    key = calibrate.case_program_key(case, 2)
    for changed in (dataclasses.replace(case, per_chip_batch=2),
                    dataclasses.replace(case, xla_flags="--xla_enable_async_all_gather=true")):
        assert calibrate.case_program_key(changed, 2) != key
    recompiled = calibrate.compile_or_keep(case, 2, str(tmp_path / "run3"), recompile=True)
    assert recompiled["kept"] is None
    assert recompiled["same_as_stored"] is True  # XLA compiled the same key the same way
    assert recompiled["predicted_step_seconds"] == first["predicted_step_seconds"]


@pytest.mark.slow  # one small compile: ~40 s
def test_a_compile_that_cannot_be_written_is_one_line(tmp_path):
    """A full disk or quota under --hlo-dir (here `ulimit -f`, below the program's size) is
    found after the compile, when its program is written: one line naming the file, exit 2."""
    import resource
    import subprocess
    import sys

    from train_utils import REPO

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    hlo_dir = tmp_path / "hlo"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "calibrate_step_model.py"), "--cases", "",
         "--check-extrapolation", "--layers", "1", "--hlo-dir", str(hlo_dir)],
        capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: file too large (the file system's or `ulimit -f` limit) writing "
        f"{hlo_dir / 'calibrate-check-1b-v5p-8-1l.hlo'}"]
    assert not (hlo_dir / "calibrate-check-1b-v5p-8-1l.hlo").exists()  # no partial program
