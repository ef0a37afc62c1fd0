"""The K2 decoder-only transformer (Hugging Face LlamaForCausalLM, exactly).

Layers are scanned by default (`model.scan_layers`): one layer is traced and compiled whatever
the depth, and its parameters are stacked on a leading "layers" axis. Remat policies trade
recomputation for activation memory.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.model.layers import (DecoderLayer, RMSNorm, constrain, dtype_of, logical_param,
                                project, weight_init)
from k2jax.model.rope import rope_cos_sin

_SAVED_PROJECTIONS = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_out")
# MaxText's `remat_policy: custom` of its v6e recipes (decoder_layer_input, query_proj,
# key_proj, value_proj and out_proj "offload"; everything else "remat"): the layer input and
# the attention's q/k/v and output projections, not the MLP output.
_MAXTEXT_OFFLOADED = ("decoder_layer_input", "query_proj", "key_proj", "value_proj",
                      "attention_out")


def remat_policy(name: str, save: tuple = (), offload: tuple = ()):
    """jax.checkpoint policy for `model.remat` (None: no remat at all); `save`/`offload`: the
    tensors `custom` keeps on device / in pinned host memory (model.remat_save/_offload)."""
    policies = jax.checkpoint_policies
    if name == "custom":  # MaxText's custom policy: each named tensor device, offload or remat
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(save), names_which_can_be_offloaded=list(offload),
            offload_src="device", offload_dst="pinned_host")
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "save_dots": policies.checkpoint_dots,
        "save_dots_no_batch": policies.dots_with_no_batch_dims_saveable,
        "save_qkv_out": policies.save_only_these_names(*_SAVED_PROJECTIONS),
        # save_qkv_out's tensors kept in pinned host memory between the forward and the
        # backward pass instead of HBM (MaxText's offloaded remat): HBM for PCIe traffic.
        "offload_qkv_out": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(_SAVED_PROJECTIONS),
            offload_src="device", offload_dst="pinned_host"),
        # MaxText's offloading recipe exactly (= `custom` with remat_offload _MAXTEXT_OFFLOADED):
        # the backward recomputes each layer from the offloaded layer input.
        "offload_input_qkv_out": policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=list(_MAXTEXT_OFFLOADED),
            offload_src="device", offload_dst="pinned_host"),
    }[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rounded_logits(logits_BxSxV: jnp.ndarray, dtype: str) -> jnp.ndarray:
    """fp32 logits rounded to `dtype` (model.logits_dtype) and widened back, for the fp32
    loss; the backward rounds dlogits to `dtype` likewise. K2's output_layer is a bf16 linear:
    its logits reach the fp32 cross entropy rounded, and its input gradient is bf16."""
    return logits_BxSxV.astype(dtype).astype(logits_BxSxV.dtype)


def _rounded_logits_fwd(logits_BxSxV, dtype):
    return rounded_logits(logits_BxSxV, dtype), None


def _rounded_logits_bwd(dtype, _, grad_BxSxV):
    return (grad_BxSxV.astype(dtype).astype(grad_BxSxV.dtype),)


rounded_logits.defvjp(_rounded_logits_fwd, _rounded_logits_bwd)


def output_logits(x_BxSxE: jnp.ndarray, head_ExV: jnp.ndarray, logits_dtype: str) -> jnp.ndarray:
    """The final normed hidden states through the output projection: fp32 logits [B, S, V]
    rounded to `logits_dtype` (model.logits_dtype). The loss applies it a chunk of the sequence
    at a time (model/chunked_loss.py); the model to the whole sequence."""
    logits = project(x_BxSxE, head_ExV, preferred_element_type=jnp.float32)
    if logits_dtype != "float32":
        logits = rounded_logits(logits, logits_dtype)
    return constrain(logits, ("batch", "length", "vocab"))


class K2Model(nn.Module):
    """tokens int32 [B, S] -> logits float32 [B, S, vocab] (rounded to model.logits_dtype), or
    with return_hidden=True (final normed hidden states [B, S, E], output head [E, V]): the
    head's parameter (lm_head, or embed_tokens.T when tied) for a caller applying
    `output_logits` itself."""

    config: ModelConfig

    def _layer_class(self):
        cfg = self.config
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat, tuple(cfg.remat_save),
                                                        tuple(cfg.remat_offload)),
                             prevent_cse=not cfg.scan_layers)
        return layer

    @nn.compact
    def __call__(self, tokens_BxS: jnp.ndarray, positions_BxS: Optional[jnp.ndarray] = None,
                 segment_ids_BxS: Optional[jnp.ndarray] = None, return_hidden: bool = False):
        cfg = self.config
        pdtype, compute = dtype_of(cfg.param_dtype), dtype_of(cfg.compute_dtype)
        init = weight_init(cfg)  # Megatron's init_method for embedding and lm_head alike
        if positions_BxS is None:
            positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)

        embedding_VxE = logical_param(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size),
                                      ("vocab", "embed"), init, pdtype)
        x_BxSxE = jnp.take(embedding_VxE, tokens_BxS, axis=0).astype(compute)
        x_BxSxE = constrain(x_BxSxE, ("batch", "length", "embed"))
        cos, sin = rope_cos_sin(positions_BxS, cfg.resolved_head_dim, cfg.rope_theta, compute,
                                cfg.rope_freq_dtype)

        layer = self._layer_class()
        if cfg.scan_layers:
            scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                              length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxSxE, _ = scanned(cfg, name="layers")(x_BxSxE, cos, sin, segment_ids_BxS)
        else:
            for i in range(cfg.num_layers):
                x_BxSxE, _ = layer(cfg, name=f"layers_{i}")(x_BxSxE, cos, sin, segment_ids_BxS)

        x_BxSxE = RMSNorm(cfg, name="final_norm")(x_BxSxE)
        if cfg.tie_word_embeddings:
            head_ExV = embedding_VxE.T
        else:
            head_ExV = logical_param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size),
                                     ("embed", "vocab"), init, pdtype)
        if return_hidden:
            return x_BxSxE, head_ExV
        return output_logits(x_BxSxE, head_ExV, cfg.logits_dtype)
