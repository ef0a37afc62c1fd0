"""compare-curves on hand-made curves: the right differences, a valid PNG, clear bad input."""

import json
import struct

import pytest

from k2jax.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, losses: dict):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "loss": loss, "lr": 1e-4}) + "\n")


def write_wandb_csv(path, losses: dict):
    # The layout of a W&B panel export: Step, "<run> - <metric>" and its __MIN/__MAX siblings.
    lines = ['"Step","k2 - lm loss","k2 - lm loss__MIN","k2 - lm loss__MAX"']
    for step, loss in losses.items():
        value = "" if loss is None else f"{loss}"
        lines.append(f"{step},{value},{value},{value}")
    path.write_text("\n".join(lines) + "\n")


def curves(tmp_path):
    run = {s: 3.0 - 0.1 * s for s in range(1, 11)}
    reference = {s: 3.0 - 0.1 * s for s in range(0, 13)}
    reference[4] += 0.02  # run - reference = -0.02: below the threshold
    reference[7] -= 0.2  # run - reference = +0.2: parts
    reference[9] = None  # an empty cell is skipped, not a common step
    write_run(tmp_path / "run", run)
    write_wandb_csv(tmp_path / "ref.csv", reference)


def test_differences_and_png(tmp_path, capsys):
    curves(tmp_path)
    out = tmp_path / "plot.png"
    code = main(["compare-curves", "--run", str(tmp_path / "run"), "--reference",
                 str(tmp_path / "ref.csv"), "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1  # step 7 parts by more than 0.05
    assert summary["common_steps"] == 9  # steps 1..10 without 9
    assert summary["max_abs_diff"] == pytest.approx(0.2)
    assert summary["max_abs_diff_step"] == 7
    assert summary["mean_abs_diff"] == pytest.approx(0.22 / 9)
    assert [p["step"] for p in summary["parted"]] == [7]
    assert summary["parted"][0]["diff"] == pytest.approx(0.2)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR: the first chunk
    assert data[12:16] == b"IHDR" and width > 500 and height > 300
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".plot")] == []


def test_steps_range_table_and_eval_loss_jsonl(tmp_path, capsys):
    curves(tmp_path)
    code = main(["compare-curves", "--run", str(tmp_path / "run"), "--reference",
                 str(tmp_path / "ref.csv"), "--steps", "1:7"])
    out = capsys.readouterr().out
    assert code == 0 and "common steps       6" in out and "0.020000  at step 4" in out
    # eval-loss output: `iteration` (= step + 1) is what W&B and metrics.jsonl call the step.
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"step": 5, "iteration": 6, "loss": 2.4, "tokens": 10}) + "\n")
    code = main(["compare-curves", "--run", str(tmp_path / "eval.jsonl"), "--reference",
                 str(tmp_path / "ref.csv"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["common_steps"] == 1 and summary["max_abs_diff_step"] == 6
    assert summary["max_abs_diff"] == pytest.approx(0.0, abs=1e-12)


def test_explicit_columns(tmp_path, capsys):
    curves(tmp_path)
    (tmp_path / "plain.csv").write_text("iteration,my_loss\n1,2.9\n2,2.8\n")
    code = main(["compare-curves", "--run", str(tmp_path / "run"), "--reference",
                 str(tmp_path / "plain.csv"), "--loss-column", "my_loss", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["common_steps"] == 2 and summary["max_abs_diff"] < 1e-9


@pytest.mark.parametrize("reference,args,needle", [
    ("Step,accuracy\n1,0.5\n", [], "no loss column"),
    ("Step,loss,lm loss\n1,2,2\n", [], None),  # exact names: 'lm loss' wins, no ambiguity
    ("Step,a - lm loss,b - lm loss\n1,2,2\n", [], "several loss columns"),
    ("Step,loss\n1,2.9\n", ["--steps", "9:3"], "9:3"),
    ("Step,loss\n1,2.9\n", ["--steps", "5:"], "no common steps"),
    ("Step,loss\n1,2.9\n", ["--run", "/nonexistent/run"], "/nonexistent/run"),
    ("Step,loss\n1,2.9\n", ["--out", "/nonexistent/dir/p.png"], "/nonexistent/dir"),
    ("Step,loss\n1,2.9\n", ["--loss-column", "nope"], "nope"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, reference, args, needle):
    curves(tmp_path)
    (tmp_path / "bad.csv").write_text(reference)
    run = [] if "--run" in args else ["--run", str(tmp_path / "run")]
    code = main(["compare-curves", *run, "--reference", str(tmp_path / "bad.csv"), *args])
    err = capsys.readouterr().err.strip()
    if needle is None:
        assert code in (0, 1) and not err
        return
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("k2jax compare-curves: error: ") and needle in err, err
