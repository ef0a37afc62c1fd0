"""The calibration's choice of cases (benchmarks/calibrate_step_model.py): its default run is
every published recipe once, and a run left out of it only repeats one of them, so the quick
run still covers what the step-time model was asked to be checked on."""

from __future__ import annotations

from calibration_script import calibration_module
from k2jax.aot.topology import parse_slice


def _generation(case) -> str:
    return parse_slice(case.topology).generation.name


def test_a_run_left_out_of_the_calibration_repeats_a_calibration_recipe():
    calibrate = calibration_module()
    calibration = {c.name: c for c in calibrate.calibration_cases()}
    repeats = [c for c in calibrate.CASES if c.name not in calibration]
    assert repeats, "--cases all would add nothing"
    for case in repeats:
        recipe = calibration[case.repeats]  # a KeyError names a repeat of no calibration case
        assert (_generation(case), case.remat, case.seq_len, case.slices) == (
            _generation(recipe), recipe.remat, recipe.seq_len, recipe.slices), case.name
        assert case.libtpu_init_args == recipe.libtpu_init_args, case.name
        # The same attention kernel settings; the flags are the recipe's, at most one more.
        assert [o for o in case.overrides if o.startswith("model.attention")] == [
            o for o in recipe.overrides if o.startswith("model.attention")], case.name
        assert set(recipe.xla_flags.split()) <= set(case.xla_flags.split()), case.name
        assert len(set(case.xla_flags.split()) - set(recipe.xla_flags.split())) <= 1, case.name


def test_the_calibration_covers_what_the_step_model_is_checked_on():
    """Issue 25: the 32B v5p-128 re-measurement, the 64B v5p-128 run, multi-slice, and v6e
    runs of a model under 20B and one over 100B parameters."""
    calibrate = calibration_module()
    cases = calibrate.calibration_cases()
    names = {c.name for c in cases}
    assert {"32b-v5p-128-2025", "64b-v5p-128"} <= names
    assert any(c.slices > 1 for c in cases)
    v6e_hidden = {c.model["hidden"] for c in cases if _generation(c) == "v6e"}
    assert min(v6e_hidden) <= 4096 and max(v6e_hidden) >= 12288
    assert len({_generation(c) for c in cases}) == 3  # v5p, v5e, v6e


def test_cases_takes_groups_and_names_together(capsys):
    calibrate = calibration_module()
    chosen = calibrate.chosen_cases("mistral-7b-v6e-8,calibration")
    assert [c.name for c in chosen] == [c.name for c in calibrate.CASES
                                        if not c.repeats or c.name == "mistral-7b-v6e-8"]
    assert len(calibrate.chosen_cases("all,32b-v5p-128")) == len(calibrate.CASES)
    assert calibrate.chosen_cases("") == []
    assert calibrate.chosen_cases("calibration,nope") is None
    assert capsys.readouterr().err.strip() == (
        "--cases: unknown ['nope'] (expected 'calibration', 'all' or case names)")
