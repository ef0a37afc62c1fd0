"""What the forward (flash_attention.py) and backward (flash_attention_bwd.py) Pallas kernels of
flash attention share: how [B, S, N, D] tensors are tiled for them (Layout, BlockSpecs of q/k/v
tiles, per-row statistics and segment ids), the static description of a call, and which blocks
run at all. Both kernel modules import this one, and neither imports the other's internals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from k2jax.kernels.block_sizes import NUM_LANES, NUM_SUBLANES, Geometry

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Layout:
    """How [B, S, N, D] tensors are presented to the kernels; tiles are (rows, D) either way."""

    head_dim: int
    fused: bool  # True: [B, S, N*D]; False: [B, N, S, D]

    @classmethod
    def for_head_dim(cls, head_dim: int) -> "Layout":
        return cls(head_dim, fused=head_dim % NUM_LANES == 0)

    def to_kernel(self, x_BSND: jax.Array) -> jax.Array:
        b, s, n, d = x_BSND.shape
        return x_BSND.reshape(b, s, n * d) if self.fused else x_BSND.transpose(0, 2, 1, 3)

    def from_kernel(self, x: jax.Array, num_heads: int) -> jax.Array:
        if self.fused:
            b, s, _ = x.shape
            return x.reshape(b, s, num_heads, self.head_dim)
        return x.transpose(0, 2, 1, 3)

    def rows_per_head(self, x: jax.Array) -> jax.Array:
        """Kernel-layout array -> [B, N, S, D] view (for XLA-side reductions like delta)."""
        if self.fused:
            return x.reshape(x.shape[0], x.shape[1], -1, self.head_dim).transpose(0, 2, 1, 3)
        return x

    def block_spec(self, rows: int, index_map) -> pl.BlockSpec:
        """BlockSpec of a (rows, head_dim) tile; index_map(*grid) -> (batch, head, row_block)."""
        if self.fused:
            return pl.BlockSpec((None, rows, self.head_dim),
                                lambda *g: _fused_index(index_map(*g)))
        return pl.BlockSpec((None, None, rows, self.head_dim),
                            lambda *g: (*index_map(*g), 0))


def _fused_index(bhr):
    b, h, r = bhr
    return b, r, h


def stats_spec(rows: int, index_map) -> pl.BlockSpec:
    """Per-row fp32 statistics [B, H, S, 128], lane-replicated so a (rows, 128) tile is a whole
    number of vregs and a (rows, 1) column slice broadcasts against (rows, block_kv) scores."""
    return pl.BlockSpec((None, None, rows, NUM_LANES), lambda *g: (*index_map(*g), 0))


def segment_specs(block_q: int, block_kv: int, q_block_map, kv_block_map):
    """Specs for q segment ids [B, S, 128] (a column per row) and kv segment ids [B, 8, S]
    (a row per key, replicated over 8 sublanes for a full vreg tile)."""
    q_spec = pl.BlockSpec((None, block_q, NUM_LANES), lambda *g: (*q_block_map(*g), 0))
    kv_spec = pl.BlockSpec((None, NUM_SUBLANES, block_kv),
                           lambda *g: (kv_block_map(*g)[0], 0, kv_block_map(*g)[1]))
    return q_spec, kv_spec


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything about a call that is not an array (custom_vjp non-differentiable argument)."""

    geometry: Geometry
    layout: Layout
    num_heads: int
    num_kv_heads: int
    interpret: Any  # False, True or pltpu.InterpretParams

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def precision(self, dtype):
        # fp32 inputs must give fp32 accuracy on the MXU too (its default is bf16 passes).
        return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def load_segments(qseg_ref, kvseg_ref):
    """(q ids [bq, 128], kv ids [8, bkv]) tiles, or (None, None) without segment ids."""
    if qseg_ref is None:
        return None, None
    return qseg_ref[...], kvseg_ref[...]


def run_block(geo: Geometry, qi, kj, body) -> None:
    """Calls body(masked) for block (qi, kj) unless the mask hides it entirely; the element
    mask is applied only on blocks that need it (diagonal, padding, segments)."""
    if not geo.ever_masked:
        body(False)
        return
    runs = geo.block_runs(qi, kj)
    if geo.segmented:
        pl.when(runs)(lambda: body(True))
        return
    needs_mask = geo.block_needs_mask(qi, kj)
    pl.when(runs & needs_mask)(lambda: body(True))
    pl.when(runs & jnp.logical_not(needs_mask))(lambda: body(False))
