"""k2jax as an lm-evaluation-harness model: `--model k2jax` (see k2jax.lm_eval.backend)."""

MODEL_NAME = "k2jax"
# The model_args K2JaxLM takes (its keyword parameters); anything else is a typo, refused.
MODEL_ARGS = ("checkpoint", "hf", "tokenizer", "dtype", "batch_size", "max_length",
              "max_gen_toks", "data", "fsdp", "tensor", "attention", "logits_dtype")
# What lm-eval itself adds to every model's arguments (its --batch_size, --max_batch_size,
# --device flags): accepted, and unused but batch_size.
LM_EVAL_ARGS = ("batch_size", "max_batch_size", "device")


def register() -> None:
    """Make `k2jax` a model name of lm-eval's registry (lm-eval 0.4 has no plugin discovery:
    its registry holds the models it ships, so the name exists once this has run; `k2jax
    eval-tasks` runs it before handing over to lm-eval's own CLI)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="k2jax.lm_eval.backend:K2JaxLM")
