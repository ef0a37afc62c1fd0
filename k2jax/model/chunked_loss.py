"""The loss a chunk of the sequence at a time (`model.loss_chunk_tokens`): only one chunk's
logits ever exist.

Unchunked, a micro-batch's fp32 logits [rows, seq, vocab] are live whole, and their gradient is
built whole: at vocab 128256 and seq 8Ki that is 4.2 GB per row per copy. Chunked, the output
projection, the rounding to model.logits_dtype and the token losses run over `chunk` positions
at a time inside a `lax.scan`; the backward recomputes each chunk's logits from the final
hidden states and the head weight (about 2 x tokens x hidden x vocab extra FLOPs per step, one
more head matmul) instead of keeping them. Two ways, by the head's size a device
(`gathers_head`): a custom VJP gathers the bf16 head once a micro-batch and accumulates its
gradient whole in fp32, reduce-scattered once (fast; the whole head twice on each device), or
jax.checkpoint'd chunks, for which XLA gathers the head and reduce-scatters its gradient per
chunk (more collectives; no whole copy: what lets a 70B-class plan fit).
The numerics are the unchunked ones (bf16-rounded logits and dlogits where
configured, fp32 weight gradients under train.gradient_dtype float32); only the order of the
fp32 sums differs.

Chunk c holds positions {j * n + c} (n chunks): a strided split keeps a sharded length axis
sharded in every chunk, where contiguous chunks would put the shards on the scanned axis.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

from k2jax.errors import ConfigError
from k2jax.model.layers import constrain
from k2jax.model.loss import next_token_labels, token_losses
from k2jax.model.transformer import output_logits
from k2jax.model.weight_grad import _fp32_weight_gradients

# `auto` chunks when one device's fp32 logits of a micro-batch would exceed AUTO_TRIGGER_BYTES,
# in chunks of at most AUTO_CHUNK_BYTES per device (the backward holds a few such copies).
# Smaller chunks cost HBM time: each chunk reads and writes the fp32 head-gradient accumulator
# (hidden x vocab x 8 bytes a device; v6e-8, docs/training_numerics.md: 128-position chunks
# predicted 0.138 s a step, 512-position 0.111 s, unchunked 0.097 s).
AUTO_TRIGGER_BYTES = 1 << 30
AUTO_CHUNK_BYTES = 512 << 20
# The head gathered once a micro-batch while its bf16 copy and fp32 gradient fit this a device
# (`gathers_head`). Measured (k2jax aot, 2026-12-07): v6e-8, a 512-wide head, 4 rows a chip,
# 128-position chunks: predicted 0.138 s a step gathering once, 0.398 s per chunk (0.235 s of
# exposed collectives); a LLaMA-3-70B plan on v6e-256 (1 row a chip, seq 8Ki): 35.1 GB a chip
# gathering once (does not fit), 29.07 GB per chunk (fits).
HEAD_GATHER_BYTES = 1 << 30


def resolve_chunk_tokens(setting: Union[int, str, None], rows_per_device: float, seq_len: int,
                         vocab_per_device: float) -> Optional[int]:
    """Positions per chunk for `model.loss_chunk_tokens` (None: unchunked). `auto`: unchunked
    while one device's fp32 logits of a micro-batch stay within AUTO_TRIGGER_BYTES, else the
    largest divisor of seq_len whose chunk stays within AUTO_CHUNK_BYTES."""
    if not setting:
        return None
    if setting != "auto":
        if seq_len % setting:
            raise ConfigError("model.loss_chunk_tokens", f"{setting} does not divide the "
                              f"sequence length {seq_len}")
        return None if setting == seq_len else setting
    bytes_per_position = rows_per_device * vocab_per_device * 4
    if bytes_per_position * seq_len <= AUTO_TRIGGER_BYTES:
        return None
    fitting = [c for c in range(1, seq_len) if seq_len % c == 0
               and c * bytes_per_position <= AUTO_CHUNK_BYTES]
    return max(fitting, default=1)


def gathers_head(hidden_size: int, vocab_per_device: float) -> bool:
    """Whether the head is gathered once (bf16 copy + fp32 gradient accumulator whole on each
    device: hidden x vocab x 6 bytes) rather than per chunk: only while that is <= 1 GiB."""
    return hidden_size * vocab_per_device * 6 <= HEAD_GATHER_BYTES


def chunked_next_token_loss(hidden_BxSxE: jnp.ndarray, head_ExV: jnp.ndarray,
                            tokens_BxS: jnp.ndarray, loss_mask_BxS: jnp.ndarray,
                            logits_dtype: str, chunk: int, batch_shards: int = 1,
                            gather_head: bool = True) -> jnp.ndarray:
    """sum(token loss * mask) over the micro-batch, as masked_next_token_loss(output_logits(
    hidden, head), tokens, mask)[0] computes it, `chunk` positions at a time. `batch_shards`:
    the devices the rows are split over (mesh.rules' batch axes). gather_head: the head
    gathered and its gradient reduce-scattered once (fast, hidden x vocab x 6 bytes a device),
    else per chunk (jax.checkpoint'd chunks: the gradient stays sharded, more collectives)."""
    mask_BxS = loss_mask_BxS.astype(jnp.float32).at[:, -1].set(0.0)
    labels_BxS = next_token_labels(tokens_BxS)
    if gather_head:
        return _chunked_loss(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype, chunk,
                             batch_shards)
    return _checkpointed_chunks(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype,
                                chunk)


def _checkpointed_chunks(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype, chunk):
    """Each chunk under jax.checkpoint: autodiff recomputes its logits; XLA gathers the head
    and reduce-scatters its gradient per chunk, so no whole-head copy is ever live."""
    @functools.partial(jax.checkpoint, prevent_cse=False)  # in a scan: no CSE to prevent
    def chunk_loss(head_ExV, x_BxCxE, labels_BxC, mask_BxC):
        x_BxCxE = constrain(x_BxCxE, ("batch", "length", "embed"))
        return _masked_sum(output_logits(x_BxCxE, head_ExV, logits_dtype), labels_BxC, mask_BxC)

    def add_chunk(total, xs):
        return total + chunk_loss(head_ExV, *xs), None

    n = hidden_BxSxE.shape[1] // chunk
    chunks = (_split(hidden_BxSxE, n), _split(labels_BxS, n), _split(mask_BxS, n))
    return jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), chunks)[0]


def _split(x, n: int):
    """[B, S, ...] -> [n, B, S / n, ...]; chunk c = positions {j * n + c}."""
    x = x.reshape(x.shape[0], x.shape[1] // n, n, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0)


def _unsplit(x):
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _gathered_head(head_ExV, dtype):
    # Cast and all-gathered over the embed (FSDP) axis once per micro-batch, outside the chunk
    # loop: left inside, XLA gathered the head (and reduce-scattered its gradient) per chunk.
    return constrain(head_ExV.astype(dtype), (None, "vocab"))


def _chunk_logits(x_BxCxE, head_c, logits_dtype):
    """output_logits with the already cast head: fp32 [B, C, V], rounded to logits_dtype."""
    x_BxCxE = constrain(x_BxCxE, ("batch", "length", "embed"))
    batch, length, _ = x_BxCxE.shape
    logits = jnp.dot(x_BxCxE.reshape(batch * length, -1), head_c,
                     preferred_element_type=jnp.float32).reshape(batch, length, -1)
    if logits_dtype != "float32":
        logits = logits.astype(logits_dtype).astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


def _masked_sum(logits, labels_BxC, mask_BxC):
    return jnp.sum(token_losses(logits, labels_BxC) * mask_BxC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_loss(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype, chunk,
                  batch_shards):
    n = hidden_BxSxE.shape[1] // chunk
    head_c = _gathered_head(head_ExV, hidden_BxSxE.dtype)

    def add_chunk(total, xs):
        x, labels, mask = xs
        return total + _masked_sum(_chunk_logits(x, head_c, logits_dtype), labels, mask), None

    chunks = (_split(hidden_BxSxE, n), _split(labels_BxS, n), _split(mask_BxS, n))
    return jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), chunks)[0]


def _chunked_loss_fwd(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype, chunk,
                      batch_shards):
    loss = _chunked_loss(hidden_BxSxE, head_ExV, labels_BxS, mask_BxS, logits_dtype, chunk,
                         batch_shards)
    return loss, (hidden_BxSxE, head_ExV, labels_BxS, mask_BxS)


def _chunked_loss_bwd(logits_dtype, chunk, batch_shards, residuals, grad):
    """Each chunk's logits recomputed, then the unchunked backward's own steps: token_losses'
    dlogits, rounded to logits_dtype (rounded_logits), dx by autodiff of the matmul, dW = x^T
    dlogits accumulated over the chunks in fp32 (weight_grad.matmul: fp32 under
    train.gradient_dtype float32, else each chunk's dW in the activations' dtype), one partial
    sum per batch shard (`batch_shards`, the devices the rows are split over) until the end."""
    hidden_BxSxE, head_ExV, labels_BxS, mask_BxS = residuals
    n, dtype = hidden_BxSxE.shape[1] // chunk, hidden_BxSxE.dtype
    shards = batch_shards if hidden_BxSxE.shape[0] % batch_shards == 0 else 1
    head_c = _gathered_head(head_ExV, dtype)
    fp32_dw = _fp32_weight_gradients() and jnp.dtype(head_ExV.dtype).itemsize > jnp.dtype(
        dtype).itemsize

    def chunk_grads(dw_DxExV, xs):
        x, labels, mask = xs
        logits = _chunk_logits(x, head_c, logits_dtype)
        _, loss_vjp = jax.vjp(lambda lg: _masked_sum(lg, labels, mask), logits)
        (dlogits,) = loss_vjp(grad)
        if logits_dtype != "float32":
            dlogits = dlogits.astype(logits_dtype).astype(jnp.float32)
        x_RxE, dlogits_RxV = x.reshape(-1, x.shape[-1]), dlogits.reshape(-1, dlogits.shape[-1])
        _, x_vjp = jax.vjp(lambda v: jnp.dot(v, head_c, preferred_element_type=jnp.float32),
                           x_RxE)
        (dx_RxE,) = x_vjp(dlogits_RxV)  # autodiff's, as the unchunked backward
        # dW = x^T dlogits over this device's rows only (a leading batch-sharded axis): a
        # replicated accumulator would be all-reduced every chunk. The dot is weight_grad's.
        dw = jax.lax.dot_general(x_RxE.reshape(shards, -1, x_RxE.shape[-1]),
                                 dlogits_RxV.reshape(shards, -1, dlogits_RxV.shape[-1]),
                                 (((1,), (1,)), ((0,), (0,))),
                                 preferred_element_type=jnp.float32 if fp32_dw else dtype)
        dw_DxExV = constrain(dw_DxExV + dw.astype(jnp.float32), ("batch", None, "vocab"))
        return dw_DxExV, dx_RxE.reshape(x.shape)

    chunks = (_split(hidden_BxSxE, n), _split(labels_BxS, n), _split(mask_BxS, n))
    dw_DxExV = constrain(jnp.zeros((shards, *head_ExV.shape), jnp.float32),
                         ("batch", None, "vocab"))
    dw_DxExV, dx_chunks = jax.lax.scan(chunk_grads, dw_DxExV, chunks)
    dw_ExV = constrain(jnp.sum(dw_DxExV, axis=0), ("embed", "vocab"))  # one reduce-scatter
    return _unsplit(dx_chunks), dw_ExV.astype(head_ExV.dtype), None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
