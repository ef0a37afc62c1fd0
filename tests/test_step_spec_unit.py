"""k2jax/commands/step_spec.py: eval-loss's --steps lists and compare-curves' --steps range."""

from __future__ import annotations

import pytest

from k2jax.commands.step_spec import MAX_STEPS, parse_range, parse_steps
from k2jax.errors import UserError


@pytest.mark.parametrize("spec, steps", [
    ("94100", [94100]),
    ("94100,94101:94105", [94100, 94101, 94102, 94103, 94104]),  # A:B is half-open
    (" 3 , 1:3 ", [3, 1, 2]),  # the order given, spaces ignored
    ("5,4:7,5", [5, 4, 6]),  # duplicates dropped, first place kept
    ("0:1", [0]),
])
def test_step_lists(spec, steps):
    assert parse_steps(spec) == steps


@pytest.mark.parametrize("spec, message", [
    ("", "empty item"),
    ("1,,2", "empty item"),
    ("5:5", "range '5:5' is empty"),
    ("7:3", "range '7:3' is empty"),
    ("1.5", "'1.5' is not a step"),
    ("a:3", "'a:3' is not a step"),
    (":3", "':3' is not a step"),
    ("-1", "steps must be >= 0"),
    ("-2:1", "steps must be >= 0"),
    (f"0:{MAX_STEPS + 1}", f"more than {MAX_STEPS} steps"),
])
def test_bad_step_lists_name_the_flag_and_the_piece(spec, message):
    with pytest.raises(UserError, match="^--steps .*" + message.replace("(", r"\(")):
        parse_steps(spec)


def test_max_steps_is_allowed_exactly():
    assert len(parse_steps(f"0:{MAX_STEPS}")) == MAX_STEPS


@pytest.mark.parametrize("spec, bounds", [
    ("100:200", (100, 200)), ("100:", (100, None)), (":200", (None, 200)), (":", (None, None)),
    (" 5 : 9 ", (5, 9)),
])
def test_ranges(spec, bounds):
    assert parse_range(spec) == bounds


@pytest.mark.parametrize("spec, message", [
    ("100", "expected a half-open range"), ("a:9", "range ends must be integers"),
    ("9:9", "range is empty"), ("9:3", "range is empty"),
])
def test_bad_ranges(spec, message):
    with pytest.raises(UserError, match="^--steps .*" + message):
        parse_range(spec)
