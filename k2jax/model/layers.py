"""The building blocks of a K2 decoder layer. No biases anywhere (K2 has none).

Parameters are stored in `param_dtype` (fp32 master weights) and cast to `compute_dtype`
(bf16 for K2) at use. Every parameter carries logical axis names; k2jax/sharding maps them to
mesh axes.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from k2jax.config import ModelConfig
from k2jax.model.attention_core import dot_product_attention
from k2jax.model.rope import apply_rope
from k2jax.model.weight_grad import matmul, scale


def dtype_of(name: str):
    return jnp.dtype(name)


def logical_param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
                  init, dtype) -> jnp.ndarray:
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def project(x_BxSxI: jnp.ndarray, w: jnp.ndarray, in_dims: int = 1,
            preferred_element_type=None) -> jnp.ndarray:
    """x @ w contracting x's axes after (batch, seq) with w's first `in_dims` axes, as one 2-D
    matmul [B*S, I] @ [I, O]. `w` is the stored (fp32) parameter: it is cast to x's dtype inside
    `weight_grad.matmul`, whose weight gradient is fp32 under `train.gradient_dtype: float32`.

    Flattening keeps every gradient a plain 2-D dot too (dW = x^T dy over B*S rows). An einsum
    contracting b and s together made XLA:CPU transpose dy in memory for each weight gradient,
    which cost about 16% of a step (docs/performance.md)."""
    batch, seq = x_BxSxI.shape[:2]
    out_shape = w.shape[in_dims:]
    w_IxO = w.reshape(-1, math.prod(out_shape))
    out = matmul(x_BxSxI.reshape(batch * seq, -1), w_IxO, preferred_element_type)
    return out.reshape(batch, seq, *out_shape)


def weight_init(cfg: ModelConfig):
    """normal(initializer_range): every matrix but the two output projections (Megatron's
    init_method; the embedding and lm_head included)."""
    return nn.initializers.normal(cfg.initializer_range)


def output_projection_init(cfg: ModelConfig):
    """o_proj and down_proj: Megatron's scaled_init_method_normal, std initializer_range /
    sqrt(2 * num_layers), with model.scaled_output_init (the 2 * num_layers residual branches
    then add, together, a variance independent of depth); plain weight_init without it."""
    if not cfg.scaled_output_init:
        return weight_init(cfg)
    return nn.initializers.normal(cfg.initializer_range / math.sqrt(2.0 * cfg.num_layers))


def constrain(x: jnp.ndarray, axes: tuple[Optional[str], ...]) -> jnp.ndarray:
    """Sharding hint for activations; a no-op outside a mesh with logical axis rules."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """y = scale * x / sqrt(mean(x^2) + eps), normalised in fp32 as Hugging Face Llama does."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxE: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        scale_E = logical_param(self, "scale", (cfg.hidden_size,), ("norm",), nn.initializers.ones,
                                dtype_of(cfg.param_dtype))
        x32 = x_BxSxE.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return scale(x32.astype(dtype_of(cfg.compute_dtype)), scale_E)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxE, cos_BxSxD, sin_BxSxD, segment_ids_BxS=None):
        cfg = self.config
        head_dim = cfg.resolved_head_dim
        pdtype = dtype_of(cfg.param_dtype)
        e, n, k = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads

        def proj(name, shape, axes, init=weight_init(cfg)):  # cast to compute inside `project`
            return logical_param(self, name, shape, axes, init, pdtype)

        wq_ExNxD = proj("q_proj", (e, n, head_dim), ("embed", "heads", "head_dim"))
        wk_ExKxD = proj("k_proj", (e, k, head_dim), ("embed", "kv_heads", "head_dim"))
        wv_ExKxD = proj("v_proj", (e, k, head_dim), ("embed", "kv_heads", "head_dim"))
        wo_NxDxE = proj("o_proj", (n, head_dim, e), ("heads", "head_dim", "embed"),
                        output_projection_init(cfg))

        q = checkpoint_name(project(x_BxSxE, wq_ExNxD), "query_proj")
        key = checkpoint_name(project(x_BxSxE, wk_ExKxD), "key_proj")
        value = checkpoint_name(project(x_BxSxE, wv_ExKxD), "value_proj")
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        key = constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        q, key = apply_rope(q, cos_BxSxD, sin_BxSxD), apply_rope(key, cos_BxSxD, sin_BxSxD)
        out_BxSxNxD = dot_product_attention(
            q, key, value, impl=cfg.attention, causal=True, segment_ids=segment_ids_BxS,
            block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
            splash_backward=splash_backward(cfg))
        out_BxSxNxD = checkpoint_name(out_BxSxNxD, "context")  # before the projection
        out_BxSxE = project(out_BxSxNxD, wo_NxDxE, in_dims=2)
        return checkpoint_name(out_BxSxE, "attention_out")


def splash_backward(cfg: ModelConfig) -> dict:
    """splash's backward kernel settings of the config (model.attention_backward_blocks,
    model.attention_fused_backward)."""
    blocks = cfg.attention_backward_blocks
    return {"backward_blocks": tuple(blocks) if blocks else None,
            "fused_backward": cfg.attention_fused_backward}


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or, with model.mlp_activation relu or gelu,
    down(act(up(x)))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxE):
        cfg = self.config
        init = weight_init(cfg)
        pdtype = dtype_of(cfg.param_dtype)
        e, m = cfg.hidden_size, cfg.intermediate_size
        # gate_proj first: Linen draws each parameter's init key in creation order, so this
        # order keeps every SwiGLU model's initial weights what they were before relu existed.
        swiglu = cfg.mlp_activation == "swiglu"
        if swiglu:
            w_gate_ExM = logical_param(self, "gate_proj", (e, m), ("embed", "mlp"), init, pdtype)
        w_up_ExM = logical_param(self, "up_proj", (e, m), ("embed", "mlp"), init, pdtype)
        w_down_MxE = logical_param(self, "down_proj", (m, e), ("mlp", "embed"),
                                   output_projection_init(cfg), pdtype)
        up_BxSxM = project(x_BxSxE, w_up_ExM)
        if swiglu:
            hidden_BxSxM = jax.nn.silu(project(x_BxSxE, w_gate_ExM)) * up_BxSxM
        elif cfg.mlp_activation == "gelu":  # tanh-approximated, as flax's and MaxText's
            hidden_BxSxM = jax.nn.gelu(up_BxSxM, approximate=True)
        else:
            hidden_BxSxM = jax.nn.relu(up_BxSxM)
        hidden_BxSxM = constrain(hidden_BxSxM, ("batch", "length", "mlp"))
        out_BxSxE = project(hidden_BxSxM, w_down_MxE)
        return checkpoint_name(out_BxSxE, "mlp_out")


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible signature."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxE, cos_BxSxD, sin_BxSxD, segment_ids_BxS=None):
        # Named so that model.remat custom can offload it (the scan saves each layer's input);
        # every use below goes through the name, so an offloaded copy replaces the input.
        x_BxSxE = checkpoint_name(constrain(x_BxSxE, ("batch", "length", "embed")),
                                  "decoder_layer_input")
        h = RMSNorm(self.config, name="input_norm")(x_BxSxE)
        x_BxSxE = x_BxSxE + Attention(self.config, name="attention")(
            h, cos_BxSxD, sin_BxSxD, segment_ids_BxS)
        h = RMSNorm(self.config, name="post_attention_norm")(x_BxSxE)
        x_BxSxE = x_BxSxE + Mlp(self.config, name="mlp")(h)
        return x_BxSxE, None
