"""k2jax/progress.py: the one progress helper of every command (issue 24)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from k2jax.progress import Progress, format_amount, format_duration, resolve_mode


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", Terminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode(True, io.StringIO()) == "lines" and resolve_mode(False) == "none"
    assert resolve_mode("bar", io.StringIO()) == "bar"
    with pytest.raises(ValueError, match="auto, bar, lines, none"):
        resolve_mode("fancy")


def test_lines_are_whole_lines_with_rate_and_eta():
    stream = io.StringIO()
    with Progress("index 2 files", 4096, unit="B", binary=True, progress="lines",
                  every_s=0.0, stream=stream) as bar:
        bar.update(1024)
        bar.set_postfix_str("tensors 1/4")
        bar.update(1024)
    text = stream.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("index 2 files: 1.0 KiB of 4.0 KiB (25%), ") and "ETA" in lines[0]
    assert lines[1].endswith(", tensors 1/4")
    assert lines[-1].startswith("index 2 files: 2.0 KiB of 4.0 KiB (50%)") and "done in" in lines[-1]


def test_a_failure_prints_no_done_line_and_none_prints_nothing():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress("pack", 10, unit="row", progress="lines", stream=stream) as bar:
            bar.update(3)
            raise RuntimeError("disk")
    assert stream.getvalue() == ""  # every_s not reached, and no "done" after a failure
    quiet = io.StringIO()
    with Progress("pack", 10, progress="none", stream=quiet) as bar:
        bar.update(10)
        bar.write("a message")
    assert quiet.getvalue() == ""


def test_the_bar_is_tqdm_on_a_terminal():
    stream = Terminal()
    with Progress("train", 3, unit="step", progress="auto", stream=stream) as bar:
        bar.update(1)
        bar.set_position(0)  # a rollback
        bar.update(3)
    assert "\r" in stream.getvalue() and "train" in stream.getvalue()


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (250, "4m10s"), (7500, "2h05m"),
                                           (3 * 86400 + 4 * 3600 + 59, "3d04h")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_amounts():
    assert format_amount(1536, "B", binary=True) == "1.5 KiB"
    assert format_amount(12345, "row") == "12.3 krow"
    assert format_amount(7, "step") == "7 step"


@pytest.mark.slow  # a k2jax subprocess converting a tiny model: ~15 s
def test_convert_into_a_file_writes_lines_once(tmp_path):
    """Off a terminal `convert` drew its bar twice (at start and end, joined by \\r); now one
    final line (a tiny model converts in less than the 30 s between lines)."""
    from convert_fixtures import hf_config, hf_state, tiny_hf_model, write_hf_dir
    from train_utils import REPO, subprocess_env

    model = tiny_hf_model()
    write_hf_dir(tmp_path / "hf", hf_state(model), hf_config(model))
    result = subprocess.run([sys.executable, "-m", "k2jax.cli", "convert", "hf-to-orbax", "--hf",
                             str(tmp_path / "hf"), "--out", str(tmp_path / "out")],
                            env=subprocess_env(), cwd=REPO, capture_output=True, timeout=300)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr[-2000:]
    assert "\r" not in stderr
    progress = [line for line in stderr.splitlines() if line.startswith("hf-to-orbax:")]
    assert len(progress) == 1 and "(100%)" in progress[0] and "done in" in progress[0], stderr
