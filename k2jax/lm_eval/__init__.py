"""k2jax as an lm-evaluation-harness model: `--model k2jax` (see k2jax.lm_eval.backend)."""

MODEL_NAME = "k2jax"


def register() -> None:
    """Make `k2jax` a model name of lm-eval's registry (lm-eval 0.4 has no plugin discovery:
    its registry holds the models it ships, so the name exists once this has run; `k2jax
    eval-tasks` runs it before handing over to lm-eval's own CLI)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="k2jax.lm_eval.backend:K2JaxLM")
