"""The K2 forward pass with a key/value cache, for generation (prefill, then one token a step).

The same parameters tree as `K2Model` (scanned `layers`, walked by a lax.scan, or per-layer
`layers_{i}`, an unrolled loop), the same building blocks (RMSNorm and Mlp modules, `project`,
RoPE), so it cannot drift from the trained model; only attention differs: new queries attend to
the cache, not to their own segment.

Cache layout (one array per K and V, all layers stacked so one `lax.scan` walks them):
  keys/values  [L, B, K, T, D] in the compute dtype (K: kv heads, T: cache slots; each head's
               [T, D] contiguous, the operand layout of the attention dots)
  valid        bool [B, T]: slot t of row b holds a real token (left padding is never valid)
Slot index = the step's write offset, shared by all rows; the RoPE position of a token is its
row's count of real tokens before it, which is what transformers' generate computes from the
attention mask (`attention_mask.cumsum(-1) - 1`), so left-padded rows match unpadded ones.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.model.layers import Mlp, RMSNorm, constrain, dtype_of, project
from k2jax.model.rope import apply_rope, rope_cos_sin

CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
    keys: jnp.ndarray    # [L, B, K, T, D]
    values: jnp.ndarray  # [L, B, K, T, D]
    valid: jnp.ndarray   # bool [B, T]


def empty_cache(config: ModelConfig, batch: int, slots: int) -> KVCache:
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.resolved_head_dim)
    zeros = jnp.zeros(shape, dtype_of(config.compute_dtype))
    return KVCache(constrain(zeros, CACHE_AXES), constrain(zeros, CACHE_AXES),
                   jnp.zeros((batch, slots), bool))


def per_layer_params(params: dict, num_layers: int) -> dict:
    """The per-layer `layers_{i}` layout of `params` (the scanned layout split once, on the
    devices the weights are on). A decode step reads every weight once; on a CPU the scanned
    layout made XLA copy each layer's weights out of the stack first, at twice the step's
    time (benchmarks/generate.py, docs/performance.md)."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def cached_attention(q_BxSxNxD, keys_BxKxTxD, values_BxKxTxD, mask_BxSxT) -> jnp.ndarray:
    """softmax(q k^T / sqrt(D) masked) v over the cache: logits and softmax in fp32, output in
    q's dtype; a query group's heads share their kv head (GQA). -> [B, S, N, D]."""
    batch, seq, num_heads, head_dim = q_BxSxNxD.shape
    num_kv = keys_BxKxTxD.shape[1]
    q_BxSxKxGxD = q_BxSxNxD.reshape(batch, seq, num_kv, num_heads // num_kv, head_dim)
    logits = jnp.einsum("bskgd,bktd->bkgst", q_BxSxKxGxD, keys_BxKxTxD,
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    logits = jnp.where(mask_BxSxT[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values_BxKxTxD.dtype)
    out = jnp.einsum("bkgst,bktd->bskgd", probs, values_BxKxTxD)
    return out.reshape(batch, seq, num_heads, head_dim)


def forward_with_cache(params: dict, config: ModelConfig, tokens_BxS: jnp.ndarray,
                       valid_BxS: jnp.ndarray, positions_BxS: jnp.ndarray, cache: KVCache,
                       offset: jnp.ndarray, last_only: bool = False
                       ) -> tuple[jnp.ndarray, KVCache]:
    """Run S new tokens per row, written to cache slots [offset, offset + S).

    tokens int32 [B, S]; valid bool [B, S] (False: padding, never attended to); positions
    int32 [B, S] (RoPE); offset: int32 scalar. A new token attends to valid slots up to its
    own. Returns logits float32 [B, S or 1, V] (last_only: the last position only, which with
    left padding is every row's last real token) and the updated cache.
    """
    cfg = config
    compute = dtype_of(cfg.compute_dtype)
    seq, slots = tokens_BxS.shape[1], cache.valid.shape[1]
    valid_BxT = jax.lax.dynamic_update_slice(cache.valid, valid_BxS, (0, offset))
    query_slot_S = offset + jnp.arange(seq)
    mask_BxSxT = valid_BxT[:, None, :] & (jnp.arange(slots)[None, None, :]
                                          <= query_slot_S[None, :, None])

    x_BxSxE = jnp.take(params["embed_tokens"], tokens_BxS, axis=0).astype(compute)
    cos, sin = rope_cos_sin(positions_BxS, cfg.resolved_head_dim, cfg.rope_theta, compute,
                            cfg.rope_freq_dtype)
    norm, mlp = RMSNorm(cfg), Mlp(cfg)

    def layer(carry, per_layer):
        # The whole cache rides in the carry, written one layer's new K/V at a time (scanning
        # it as xs -> ys measured 1 GiB more temporaries per chip for K2-65B, 32 x 4096 on
        # v5p-16; docs/performance.md).
        x_BxSxE, keys_LxBxKxTxD, values_LxBxKxTxD = carry
        p, index = per_layer
        attn = p["attention"]
        h = norm.apply({"params": p["input_norm"]}, x_BxSxE)
        q = apply_rope(project(h, attn["q_proj"]), cos, sin)
        k = apply_rope(project(h, attn["k_proj"]), cos, sin)
        v = project(h, attn["v_proj"])
        at = (index, 0, 0, offset, 0)
        new_k = k.astype(compute).transpose(0, 2, 1, 3)[None]  # [1, B, K, S, D]
        new_v = v.astype(compute).transpose(0, 2, 1, 3)[None]
        keys_LxBxKxTxD = jax.lax.dynamic_update_slice(keys_LxBxKxTxD, new_k, at)
        values_LxBxKxTxD = jax.lax.dynamic_update_slice(values_LxBxKxTxD, new_v, at)
        out = cached_attention(q, keys_LxBxKxTxD[index], values_LxBxKxTxD[index], mask_BxSxT)
        x_BxSxE = x_BxSxE + project(out, attn["o_proj"], in_dims=2)
        h = norm.apply({"params": p["post_attention_norm"]}, x_BxSxE)
        x_BxSxE = x_BxSxE + mlp.apply({"params": p["mlp"]}, h)
        return (x_BxSxE, keys_LxBxKxTxD, values_LxBxKxTxD), None

    carry = (x_BxSxE, cache.keys, cache.values)
    if "layers" in params:  # scanned layout: one layer's weights sliced per iteration
        carry, _ = jax.lax.scan(layer, carry, (params["layers"],
                                               jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    else:  # per-layer layout: each layer's weights read in place
        for i in range(cfg.num_layers):
            carry, _ = layer(carry, (params[f"layers_{i}"], i))
    x_BxSxE, keys, values = carry
    if last_only:
        x_BxSxE = x_BxSxE[:, -1:]
    x_BxSxE = norm.apply({"params": params["final_norm"]}, x_BxSxE)
    head_ExV = params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = project(x_BxSxE, head_ExV, preferred_element_type=jnp.float32)
    if cfg.logits_dtype != "float32":  # as the model's forward (model.logits_dtype): K2 scored
        logits = logits.astype(cfg.logits_dtype).astype(jnp.float32)  # in bf16
    cache = KVCache(constrain(keys, CACHE_AXES), constrain(values, CACHE_AXES), valid_BxT)
    return logits, cache

