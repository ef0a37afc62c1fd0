"""benchmarks/calibrate_step_model.py as a module, for the tests that check its cases."""

from __future__ import annotations

import importlib.util
import sys

from train_utils import REPO


def calibration_module():
    """The calibration script, loaded once per session (its dataclasses look their module up
    in sys.modules, so it is registered there before it runs)."""
    name = "calibrate_step_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "benchmarks" / "calibrate_step_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
