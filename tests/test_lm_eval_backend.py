"""The k2jax lm-eval backend against lm-eval's own `hf` backend on the same tiny weights: every
request's log-likelihood within 1e-4, identical generations and identical task metrics, on local
multiple-choice, generation and rolling-log-likelihood tasks."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's hf backend (the reference) needs lm-eval[hf]")

from lm_eval_fixtures import build_checkpoint, write_tasks  # noqa: E402

pytestmark = pytest.mark.slow  # two full lm-eval runs (one in torch, one compiled in JAX)


def evaluate(model: str, model_args: dict, tasks: list[str], include: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from k2jax.lm_eval import register

    register()
    return simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                           task_manager=TaskManager(include_path=include), batch_size=4,
                           device="cpu", log_samples=True, bootstrap_iters=0)


def flat_numbers(response) -> list:
    """Every number of a response ((logprob, is_greedy), a float, or a string), in order."""
    if isinstance(response, (list, tuple)):
        return [x for item in response for x in flat_numbers(item)]
    return [response]


def test_k2jax_backend_equals_hf_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_dir = build_checkpoint(tmp_path / "hf")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    tasks = write_tasks(tasks_dir)
    ours = evaluate("k2jax", {"hf": str(hf_dir), "dtype": "fp32", "attention": "xla"}, tasks,
                    str(tasks_dir))
    reference = evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32"}, tasks,
                         str(tasks_dir))
    compared = 0
    for task in tasks:
        ours_samples = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        ref_samples = sorted(reference["samples"][task], key=lambda s: s["doc_id"])
        assert len(ours_samples) == len(ref_samples) > 0
        for a, b in zip(ours_samples, ref_samples):
            for x, y in zip(flat_numbers(a["resps"]), flat_numbers(b["resps"]), strict=True):
                if isinstance(x, float) and not isinstance(x, bool):
                    assert math.isclose(x, y, abs_tol=1e-4), (task, a["doc_id"], x, y)
                    compared += 1
                else:
                    assert x == y, (task, a["doc_id"], x, y)
        ours_metrics = {k: v for k, v in ours["results"][task].items() if "stderr" not in k}
        ref_metrics = {k: v for k, v in reference["results"][task].items() if "stderr" not in k}
        for key, value in ref_metrics.items():
            if isinstance(value, float) and ("perplexity" in key or "bits" in key):
                assert math.isclose(ours_metrics[key], value, rel_tol=1e-5), (task, key)
            else:
                assert ours_metrics[key] == value, (task, key)
    assert compared > 12 * 4  # at least the multiple-choice log-likelihoods
    generations = [s["resps"][0][0] for s in ours["samples"]["k2jax_tiny_gen"]]
    assert any(g.strip() for g in generations)  # the generation task generates text
