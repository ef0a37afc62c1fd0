"""Tiny random Hugging Face Llama models built in-process (no download)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size=250, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
               num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, max_positions=64,
               seed=0, tie_word_embeddings=False) -> LlamaForCausalLM:
    """A random LlamaForCausalLM in fp32 whose every tensor is non-trivial.

    Embeddings get a small std (0.02) so the RMSNorm eps matters; norm scales are random, not
    ones, so a missing or misplaced norm shows up in the logits.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        rope_theta=rope_theta, rms_norm_eps=rms_norm_eps, tie_word_embeddings=tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", initializer_range=0.02,
        bos_token_id=None, eos_token_id=2, pad_token_id=0, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name:
                tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))
            elif "embed_tokens" in name:
                tensor.copy_(0.02 * torch.randn_like(tensor))
            else:
                tensor.copy_(torch.randn_like(tensor) / np.sqrt(tensor.shape[-1]))
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
