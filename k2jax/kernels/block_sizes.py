"""Block sizes per TPU generation, and the block geometry shared by the attention kernels.

Two concerns live here because both kernels (forward and backward) need them and they are
pure integer arithmetic about blocks:

* `default_block_sizes`: the (block_q, block_kv) tile each generation gets unless the caller
  overrides it (config keys `model.attention_block_q` / `model.attention_block_kv`).
* `Geometry`: given the (padded) sequence and block sizes, which (q block, kv block) pairs the
  causal mask hides entirely (skipped), which need an element mask, and the in-block mask.

Why these defaults (see docs/attention.md for the full argument): K and V are re-streamed from
HBM once per q block, so `block_q` sets the kernel's arithmetic intensity (about block_q
FLOPs per HBM byte) and must exceed the chip's FLOP/byte ratio; `block_kv` sets the work per
grid step, which must amortise the ~0.35 us fixed cost of a step, while larger blocks waste more
work on the blocks that straddle the causal diagonal. They are reasoned, not tuned on hardware:
`benchmarks/attention.py --block-q --block-kv` is how to tune them.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

# TPU vregs are (8 sublanes x 128 lanes); bf16 packs 16 rows per vreg. Compiled kernels need
# blocks that tile vregs exactly; interpret mode (CPU) only needs sublane alignment.
TPU_BLOCK_MULTIPLE = 128
INTERPRET_BLOCK_MULTIPLE = 8
NUM_LANES = 128
NUM_SUBLANES = 8


class BlockSizes(NamedTuple):
    """Tile sizes in tokens: `block_q` query rows and `block_kv` key/value rows per grid step."""

    block_q: int
    block_kv: int


# generation -> (block_q, block_kv). FLOP/byte ratios (bf16 peak / HBM bandwidth): v4 ~229,
# v5e ~240, v5p ~166, v6e ~560; block_q must exceed them. The cpu entry is for interpret mode,
# where bigger blocks simply mean fewer (slow, simulated) grid steps.
_DEFAULTS = {
    "v4": BlockSizes(512, 512),    # 16 MiB scoped VMEM per core: stay modest
    "v5e": BlockSizes(512, 512),
    "v5p": BlockSizes(512, 512),
    "v6e": BlockSizes(1024, 512),  # 918 TFLOP/s: needs ~560 FLOPs/byte, so block_q 1024
    "cpu": BlockSizes(128, 128),
}
GENERATIONS = tuple(_DEFAULTS)


def tpu_generation(device_kind_or_generation: Optional[str] = None) -> str:
    """Maps a generation name ("v5p") or a jax `device_kind` ("TPU v5 lite") to a key of the
    defaults table; None means the default device. Unknown TPUs map to "v5p" (the middle)."""
    if device_kind_or_generation is None:
        device_kind_or_generation = jax.devices()[0].device_kind
    kind = str(device_kind_or_generation).lower().replace("tpu", "").strip()
    if kind in _DEFAULTS:
        return kind
    if "cpu" in kind or "gpu" in kind or "cuda" in kind:
        return "cpu"
    if kind.startswith("v4"):
        return "v4"
    if kind.startswith(("v5 lite", "v5lite", "v5e")):
        return "v5e"
    if kind.startswith(("v6", "trillium")):
        return "v6e"
    if kind.startswith("v5"):
        return "v5p"
    raise ValueError(f"device_kind_or_generation: expected one of {GENERATIONS} or a jax "
                     f"device_kind such as 'TPU v5 lite', got {device_kind_or_generation!r}")


def idiv(a, b):
    """a // b for non-negative ints that may be traced grid indices. jnp's `//` is floor
    division, which adds sign() fix-ups that Mosaic lowers through device queries (and extra
    scalar ops); for non-negative operands truncating lax.div is the same and cheaper."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def imod(a, b):
    """a % b for non-negative ints that may be traced (see idiv)."""
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return lax.rem(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def default_block_sizes(device_kind_or_generation: Optional[str], seq_len: int) -> BlockSizes:
    """Default (block_q, block_kv) for a generation ("v4", "v5e", "v5p", "v6e", "cpu", or a
    jax device_kind; None = the default device) at sequence length `seq_len` (tokens).

    Blocks never exceed the sequence rounded up to the generation's alignment, so short
    sequences get one block instead of a mostly padded one.
    """
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
    generation = tpu_generation(device_kind_or_generation)
    multiple = INTERPRET_BLOCK_MULTIPLE if generation == "cpu" else TPU_BLOCK_MULTIPLE
    cap = round_up(seq_len, multiple)
    block_q, block_kv = _DEFAULTS[generation]
    return BlockSizes(min(block_q, cap), min(block_kv, cap))


def block_sizes_for_call(seq_len: int, block_q: Optional[int], block_kv: Optional[int],
                         interpret: bool) -> BlockSizes:
    """The blocks a kernel call uses: the caller's, or (for each None) the default of the
    generation it runs on: "cpu" in interpret mode, the attached TPU, or "v5p" when compiling
    ahead of time for a TPU from a CPU host."""
    if block_q is not None and block_kv is not None:
        return BlockSizes(block_q, block_kv)
    if interpret:
        generation = "cpu"
    elif jax.default_backend() == "tpu":
        generation = tpu_generation(jax.devices()[0].device_kind)
    else:
        generation = "v5p"
    defaults = default_block_sizes(generation, seq_len)
    return BlockSizes(defaults.block_q if block_q is None else block_q,
                      defaults.block_kv if block_kv is None else block_kv)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static tiling of one attention call (hashable: it is a custom_vjp static argument).

    seq_len: real tokens; padded_len: seq_len rounded up so both block sizes divide it.
    Queries and keys share positions (self-attention), so padding only masks keys >= seq_len;
    padded query rows are computed and sliced away (their output cotangent is zero).
    """

    seq_len: int
    padded_len: int
    block_q: int
    block_kv: int
    causal: bool
    segmented: bool
    sm_scale: float

    @property
    def num_q_blocks(self) -> int:
        return self.padded_len // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.padded_len // self.block_kv

    @property
    def padded(self) -> bool:
        return self.padded_len != self.seq_len

    # Block indices below are traced int32 scalars (grid program ids); all arithmetic is jnp so
    # the same functions serve index maps (DMA clamping) and kernel bodies (compute skipping).

    def last_kv_block(self, q_block):
        """Last kv block that q block `q_block` sees: beyond it every key is either in the
        future (causal) or padding."""
        last = (self.seq_len - 1) // self.block_kv
        if self.causal:
            last = jnp.minimum(last, idiv((q_block + 1) * self.block_q - 1, self.block_kv))
        return last

    def first_q_block(self, kv_block):
        """First q block that sees kv block `kv_block` (causal: earlier queries do not)."""
        if self.causal:
            return idiv(kv_block * self.block_kv, self.block_q)
        return jnp.int32(0)

    def last_q_block(self):
        """Last q block holding a real token (later ones are all padding: zero cotangent)."""
        return (self.seq_len - 1) // self.block_q

    def block_runs(self, q_block, kv_block):
        """Whether block (q_block, kv_block) has any visible (query, key) pair."""
        return kv_block <= self.last_kv_block(q_block)

    def block_needs_mask(self, q_block, kv_block):
        """Whether some pair in the block is hidden (so the element mask must be applied).
        Blocks fully below the diagonal and free of padding skip the mask's VPU work."""
        if self.segmented:
            return jnp.bool_(True)
        kv_end = (kv_block + 1) * self.block_kv  # one past the block's last key
        needs = jnp.bool_(False)
        if self.causal:
            needs = needs | (kv_end - 1 > q_block * self.block_q)
        if self.padded:
            needs = needs | (kv_end > self.seq_len)
        return needs

    @property
    def ever_masked(self) -> bool:
        return self.causal or self.segmented or self.padded

    def mask(self, q_block, kv_block, q_segment_ids=None, kv_segment_ids=None):
        """Boolean [block_q, block_kv] visibility of keys to queries in one block.

        q_segment_ids: int32 [block_q, 1] (or lane-broadcast [block_q, n]); kv_segment_ids:
        int32 [1, block_kv]. Positions come from iotas offset by the block starts.
        """
        shape = (self.block_q, self.block_kv)
        row = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + q_block * self.block_q
        col = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + kv_block * self.block_kv
        visible = jnp.ones(shape, jnp.bool_)
        if self.causal:
            visible = col <= row
        if self.padded:
            visible = visible & (col < self.seq_len)
        if self.segmented:
            visible = visible & (q_segment_ids[:, :1] == kv_segment_ids[:1, :])
        return visible
