"""Per-row loss weights that make one weighted sum equal K2's loss normalisation.

`global`: loss = sum(loss * mask) / sum(mask) over the whole global batch.

`per_group` (K2's, i.e. Megatron's): the global batch is cut into consecutive groups of
`group_rows` rows (K2: 4, one data-parallel rank's micro-batch); each group's loss is its own
masked mean sum(loss * mask) / sum(mask), and the step's loss is the mean of the group losses
(LLM360/k2-train main.py `loss_func`: sum(losses * loss_mask) / loss_mask.sum() per
micro-batch of one rank; Megatron's schedules divide it by the number of micro-batches and the
gradient all-reduce averages over data-parallel ranks; Megatron's sampler hands each rank
consecutive rows of the global batch).
The two agree when every group has the same mask count. Training needs whole groups (config
check); an evaluation of a batch that is not (eval-loss --global-batch 2 under K2's groups of
4) makes its last rows a smaller group of their own (docs/evaluation.md).

Both are written as loss = sum(loss * mask * w_row) / divisor, so micro-batch accumulation only
sums, whatever the micro-batch size and mesh: global w = 1, divisor = sum(mask); per_group
w = 1 / count(group of the row), divisor = number of groups. Padding rows (past the real
`rows`, loss mask 0) get weight 0. A group with no counted token (possible only with a custom
mask; Megatron would divide 0 by 0) is left out of the mean rather than making the loss NaN.
"""

from __future__ import annotations

import jax.numpy as jnp


def counted_tokens_per_row(loss_mask_PxS: jnp.ndarray) -> jnp.ndarray:
    """float32 [P]: the mask summed over the positions that predict a token (the last position
    of a row has no label and is never counted, as in masked_next_token_loss)."""
    return jnp.sum(loss_mask_PxS[:, :-1].astype(jnp.float32), axis=1)


def loss_row_weights(loss_mask_PxS: jnp.ndarray, rows: int, normalization: str,
                     group_rows: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(row weights float32 [P], divisor float32 scalar) for a device batch of P >= `rows`
    rows whose first `rows` are the step's global batch in order (the rest padding)."""
    row_counts_P = counted_tokens_per_row(loss_mask_PxS)
    padded = row_counts_P.shape[0]
    if normalization == "global":
        return jnp.ones((padded,), jnp.float32), jnp.maximum(jnp.sum(row_counts_P), 1.0)
    if normalization != "per_group":
        raise ValueError(f"unknown loss normalization {normalization!r}")
    if group_rows <= 0 or rows > padded:
        raise ValueError(f"{rows} rows in groups of {group_rows} do not fit {padded}")
    groups = -(-rows // group_rows)  # a last, partial group when rows % group_rows (eval only)
    in_groups = jnp.zeros((groups * group_rows,), jnp.float32).at[:rows].set(row_counts_P[:rows])
    group_counts_G = jnp.sum(in_groups.reshape(groups, group_rows), axis=1)
    counted_G = group_counts_G > 0
    group_weights_G = jnp.where(counted_G, 1.0 / jnp.where(counted_G, group_counts_G, 1.0), 0.0)
    weights_P = jnp.concatenate([jnp.repeat(group_weights_G, group_rows)[:rows],
                                 jnp.zeros((padded - rows,), jnp.float32)])
    return weights_P, jnp.maximum(jnp.sum(counted_G.astype(jnp.float32)), 1.0)
