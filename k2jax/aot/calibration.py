"""The step-time model's calibration record and the band it puts around a prediction.

`ERRORS` are the signed relative errors of the model's predicted MFU against MaxText's published
runs, each rebuilt as published (benchmarks/calibrate_step_model.py; the table with sources and
dates is in docs/performance.md). They are measurements of the model, recorded here so that
`k2jax aot` can say how far its prediction has been from published steps, not constants of it:
rerun the calibration after changing the model and update them with the table.

An error e = predicted MFU / published MFU - 1 means the published step was the predicted one
x (1 + e), so a prediction p reads as the range p x (1 + min e) .. p x (1 + max e).
"""

from __future__ import annotations

import re

CALIBRATED_ON = "2026-12-07, jax 0.10.2 + libtpu 0.0.42.1"
ERRORS = {
    "32b-v5p-128": -0.0901,
    "64b-v5p-128": -0.0847,
    "128b-v5p-256": -0.0880,
    "32b-v5e-256": -0.0674,
    "64b-v5e-256": -0.0658,
    "32b-2xv5p-128": -0.0497,
    "64b-2xv5e-256": -0.0296,
    "32b-v5p-128-2025": +0.0028,
    "llama2-70b-v5p-512": +0.0342,
    # v6e (Trillium): tpu-recipes' published step times: published / predicted step - 1.
    "llama3.1-8b-v6e-256": +0.0175,
    "llama3.1-8b-v6e-8": +0.0225,
    "llama3.1-8b-v6e-16": +0.0335,
    "llama3.1-8b-v6e-32": +0.0308,
    "mistral-7b-v6e-8": +0.0024,
    # The two runs first costed as unseen, GPT-3 175B (+19.8% then) and Llama 3.1 405B on
    # 2 x v6e-256 (+27.3% then), now with the measured efficiencies of chips.py.
    "gpt3-175b-v6e-256": +0.0550,
    "llama3.1-405b-2xv6e-256": +0.1462,
    # Runs first costed by the model with those efficiencies (docs/performance.md says how
    # each went): Llama 3.1 8B on v6e-128 and v6e-64, Llama 3.1 405B on v5p-1024.
    "llama3.1-8b-v6e-128": +0.0294,
    "llama3.1-8b-v6e-64": -0.0070,
    "llama3.1-405b-v5p-1024": -0.0567,
}


def errors_for(generation: str | None = None, errors: dict[str, float] = ERRORS
               ) -> dict[str, float]:
    """The recorded errors of cases on `generation` (named in the case, "llama3.1-8b-v6e-8"),
    or all of them when none was run there (or no generation is given): a generation's own
    cases say most about a plan on it (the v5p/v5e ones lean pessimistic)."""
    if generation:
        chosen = {k: v for k, v in errors.items()
                  if re.search(rf"(?:^|[-x]){re.escape(generation)}-", k)}
        if chosen:
            return chosen
    return dict(errors)


def error_summary(errors: dict[str, float] = ERRORS) -> dict[str, float]:
    values = list(errors.values())
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {"cases": len(values), "mean": mean, "spread": spread, "min": min(values),
            "max": max(values), "worst": max(values, key=abs)}


def step_band(predicted_seconds: float, errors: dict[str, float] = ERRORS,
              generation: str | None = None) -> tuple[float, float]:
    """The published-equivalent step range of a predicted step (seconds)."""
    summary = error_summary(errors_for(generation, errors))
    return predicted_seconds * (1 + summary["min"]), predicted_seconds * (1 + summary["max"])

