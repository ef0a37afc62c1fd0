"""The loss a chunk of the sequence at a time (`model.loss_chunk_tokens`): only one chunk's
logits ever exist.

Unchunked, a micro-batch's fp32 logits [rows, seq, vocab] are live whole, and their gradient is
built whole: at vocab 128256 and seq 8192 that is 4.2 GB per row per copy. Chunked, the output
projection, the rounding to model.logits_dtype and the token losses run over `chunk` positions
at a time inside a `lax.scan`, each chunk under `jax.checkpoint`: the backward recomputes that
chunk's logits from the final hidden states and the head weight (about 2 x tokens x hidden x
vocab extra FLOPs per step, one more head matmul) instead of keeping them. The numerics are the
unchunked ones (bf16-rounded logits and dlogits where configured); only the order of the fp32
sums differs.

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

# `auto` chunks when one device's fp32 logits of a micro-batch would exceed AUTO_TRIGGER_BYTES,
# in chunks of at most AUTO_CHUNK_BYTES per device (the backward holds a few such copies).
AUTO_TRIGGER_BYTES = 1 << 30
AUTO_CHUNK_BYTES = 256 << 20


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


def chunked_next_token_loss(hidden_BxSxE: jnp.ndarray, head_ExV: jnp.ndarray,
                            tokens_BxS: jnp.ndarray, loss_mask_BxS: jnp.ndarray,
                            logits_dtype: str, chunk: int) -> jnp.ndarray:
    """sum(token loss * mask) over the micro-batch, as masked_next_token_loss(output_logits(
    hidden, head), tokens, mask)[0] computes it, `chunk` positions at a time."""
    batch, seq, embed = hidden_BxSxE.shape
    n = seq // chunk
    mask_BxS = loss_mask_BxS.astype(jnp.float32).at[:, -1].set(0.0)

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...], chunk c = positions {j * n + c}
        x = x.reshape(batch, chunk, n, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # in a scan: no CSE to prevent
    def chunk_loss(head_ExV, x_BxCxE, labels_BxC, mask_BxC):
        x_BxCxE = constrain(x_BxCxE, ("batch", "length", "embed"))
        logits = output_logits(x_BxCxE, head_ExV, logits_dtype)
        return jnp.sum(token_losses(logits.astype(jnp.float32), labels_BxC) * mask_BxC)

    def add_chunk(total, xs):
        return total + chunk_loss(head_ExV, *xs), None

    chunks = (split(hidden_BxSxE), split(next_token_labels(tokens_BxS)), split(mask_BxS))
    return jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), chunks)[0]
