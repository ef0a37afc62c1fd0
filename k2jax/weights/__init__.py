"""Weights for inference (eval-loss, compare-hf, generate, the lm-eval backend, benchmarks):
open a Hugging Face or k2jax directory once, read its architecture without devices, then put
the parameters on a mesh. The training side (train.init_from) restores through
k2jax/checkpoint/params_io.py, which also owns the on-disk format both sides read."""

from k2jax.weights.source import (INFERENCE_DTYPES, InferenceWeights, LoadedModel,
                                  inference_model_config, open_weights, resolve_checkpoint)

__all__ = ["INFERENCE_DTYPES", "InferenceWeights", "LoadedModel", "inference_model_config",
           "open_weights", "resolve_checkpoint"]
