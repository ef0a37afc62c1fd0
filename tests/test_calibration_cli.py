"""benchmarks/calibrate_step_model.py as a user runs it: bad arguments and unusable folders are
one line before any work, and a run in which a case could not be costed does not exit 0."""

from __future__ import annotations

import subprocess
import sys

from train_utils import REPO

SCRIPT = str(REPO / "benchmarks" / "calibrate_step_model.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120)


def test_an_unusable_hlo_dir_is_one_line_before_any_compile(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    for hlo_dir in (not_a_folder, not_a_folder / "below"):
        result = _run("--cases", "32b-v5p-128", "--hlo-dir", str(hlo_dir))
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"error: --hlo-dir {hlo_dir}: cannot be made a folder "
            f"({'File exists' if hlo_dir == not_a_folder else 'Not a directory'})"]
        assert result.stdout == ""


def test_a_case_not_costed_makes_the_run_fail_after_every_row(tmp_path):
    result = _run("--reuse", "--hlo-dir", str(tmp_path), "--cases", "32b-v5p-128,64b-v5p-128")
    assert result.returncode == 1, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 32b") or
            line.startswith("| 64b")]
    assert len(rows) == 2 and all("--reuse: no kept HLO" in row for row in rows), result.stdout
    assert result.stderr.strip() == "2 of 2 cases not costed (their rows say why)"
    assert _run("--stored", "--cases", "32b-v5p-128").returncode == 0


def test_a_layer_count_below_one_is_refused():
    result = _run("--layers", "0", "--stored")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "argument --layers: expected a positive number of layers, got 0")


def test_a_gcs_hlo_dir_is_refused_not_made_as_a_local_folder(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--cases", "32b-v5p-128", "--hlo-dir",
                             "gs://bucket/hlo"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --hlo-dir gs://bucket/hlo: expected a local folder "
                                     "(kept programs and their keys are read with local file "
                                     "access)")
    assert list(tmp_path.iterdir()) == []


def test_the_default_run_is_the_calibration_and_all_adds_the_repeated_recipes():
    calibration = _run("--stored")
    everything = _run("--stored", "--cases", "all")
    assert calibration.returncode == everything.returncode == 0, calibration.stderr[-2000:]
    def costed(result):  # each row's case and error (the rest says how long it took)
        return [tuple(line.split(" | ")[i] for i in (0, 3))
                for line in result.stdout.splitlines() if line.startswith("| ")][1:]

    rows, all_rows = costed(calibration), costed(everything)
    assert len(rows) == 13 and len(all_rows) == 19
    assert set(rows) < set(all_rows)
    assert calibration.stdout.splitlines()[-1].startswith("relative error over 13 cases: mean ")
    # The record k2jax aot's band comes from covers every case, the repeats included.
    assert everything.stdout.splitlines()[-1] == (
        "relative error over 19 cases: mean -0.9%, spread 5.9%, from -9.0% to +14.6%")
