"""Per-chip figures of the TPU generations k2jax plans for: the one table the step-time model
(k2jax/aot/step_time.py) reads.

Sources (public; docs/performance.md "Step-time model" repeats them):
- Google Cloud TPU docs, one page per generation (peak bf16 FLOP/s, HBM capacity and bandwidth,
  ICI and DCN figures): https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e
- The JAX scaling book, "How to think about TPUs" (jax-ml/scaling-book, tpus.md): HBM bandwidth,
  one-way ICI bandwidth per link, links per chip (6 on the 3-D tori v4/v5p, 4 on the 2-D v5e/v6e),
  wrap-around rules, DCN egress per chip:
  https://jax-ml.github.io/scaling-book/tpus/
- Google Cloud's TPU7x (Ironwood) page, https://cloud.google.com/tpu/docs/tpu7x: per chip
  2307 TFLOP/s bf16, 192 GiB HBM at 7380 GB/s, two TensorCores, ICI 1200 GB/s bidirectional
  (v5p's figure), DCN 100 Gbps; a dual-chiplet chip that JAX sees as two devices.
Figures are per JAX device: per chip on v4/v5p (two TensorCores run as one "megacore" device)
and v5e/v6e (one TensorCore), half a chip on tpu7x (each TensorCore its own device; the
step-time model walks one device's program, so it divides the device's own share).
"""

from __future__ import annotations

import dataclasses

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int  # per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_link_bandwidth: float  # bytes/s, one direction of one link
    ici_links: int  # per chip: 2 per torus axis (6 on a 3-D torus, 4 on a 2-D one)
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)
    wrap_min_axis: int  # an axis this long (or a multiple of it) has wrap-around links
    wrap_needs_full_axis: bool  # True: only the full pod axis (16 on v5e/v6e) wraps
    dcn_bandwidth: float  # bytes/s of data-centre network egress per chip (multi-slice)
    # Fraction of peak a large bf16 matmul reaches: the step-time model divides dot FLOPs by
    # peak x this. Stated, not fitted: see MXU_EFFICIENCY.
    mxu_efficiency: float = 1.0
    # bytes/s between host memory and HBM per chip (PCIe): offloaded remat's traffic.
    host_bandwidth: float = 1.5e10  # HOST_BANDWIDTH below
    # Side of the MXU's systolic array: a matmul dimension it holds is padded to a multiple.
    mxu_side: int = 128  # every generation before v6e (V6E_MXU_SIDE below)
    # Fractions of the rated HBM, ICI and DCN figures above that a large copy / collective
    # reaches, from public measurements (the *_EFFICIENCY constants below).
    hbm_efficiency: float = 1.0
    ici_efficiency: float = 1.0
    dcn_efficiency: float = 1.0

    @property
    def hbm_achieved(self) -> float:
        """Bytes/s of HBM traffic (reads + writes) a large copy reaches."""
        return self.hbm_bandwidth * self.hbm_efficiency

    @property
    def ici_link_achieved(self) -> float:
        """Bytes/s one direction of one link carries in a large collective."""
        return self.ici_link_bandwidth * self.ici_efficiency

    @property
    def dcn_achieved(self) -> float:
        """Bytes/s of DCN egress per chip a large multi-slice collective reaches."""
        return self.dcn_bandwidth * self.dcn_efficiency


# Efficiencies: a generation's own public measurement where there is one; otherwise its
# family's (v4 and v5p take v5e's, tpu7x takes v6e's, the generation it follows); otherwise the
# rated figure (1.0). Stated, never fitted to the calibration cases.
# XLA bf16 matmul against the chip's peak:
# - v5e: JAX's Pallas TPU matmul guide (https://docs.jax.dev/en/latest/pallas/tpu/matmul.html,
#   "XLA matmul"), jnp.matmul (8Ki)^3 bf16: 181.8 TFLOP/s of 197 = 92.3% (4096^3: 84.3%).
# - v6e: tpu-recipes microbenchmarks/README.md (2025-04), benchmark_matmul.py (8Ki)^3 bf16 on a
#   v6e-1, timed on the device trace: 827.47 TFLOP/s of 918 = 90.1%.
MXU_EFFICIENCY = 0.923
V6E_MXU_EFFICIENCY = 827.47 / 918
# HBM: v6e, the same README, benchmark_hbm.py copying 32 MiB: 1359.6 GB/s of reads + writes
# against the rated 1640: 82.9%. No other generation has a published figure.
V6E_HBM_EFFICIENCY = 1359.6 / 1640
# Host <-> HBM (PCIe), per chip and direction: the JAX scaling book's TPU chapter ("PCIe
# bandwidth is typically around 1.5e10 bytes / second per chip", with the footnote "Trillium
# (TPU v6e) has 32GB/s, about 2x higher than v5"): 1.5e10 for v4/v5p/v5e, 3.2e10 for v6e. No
# figure is published for tpu7x: it takes the typical 1.5e10.
HOST_BANDWIDTH = 1.5e10
V6E_HOST_BANDWIDTH = 3.2e10
# The MXU's systolic array, the JAX scaling book's TPU chapter: "128x128 (256x256 on TPU v6e)",
# "the dimensions of your tensors needs to be twice as large to utilize the MXU fully" on v6e.
# tpu7x's is not published: it takes v6e's, the generation it follows.
V6E_MXU_SIDE = 256

# Collectives reach less than the links' figures. Two public measurements, each compared with
# what k2jax/aot/collectives.py computes for the same collective:
# - v6e: tpu-recipes microbenchmarks/trillium/collectives/README.md (2025-04), psum of a bf16
#   17408 x 17408 matrix (0.606 GB) over a v6e-256's ICI, 235.76 GB/s in its convention
#   (2 x bytes x 255/256 / time): 5.12 ms; the model: 2 x 0.606e9 x 255/256 over both wrapped
#   axes of 2 x 9e10 = 3.35 ms, so 0.655. The same run's psum over DCN between 2 slices (each
#   chip's 0.303 GB half with its peer): 73.7 ms; the model at 1.25e10 B/s: 24.2 ms, so 0.33.
# - v5e: the JAX scaling book's sharding chapter, a profiled all-gather over a 4-chip v5e axis
#   without wrap-around: 680 us against the 560 us of the book's (and this model's) formula:
#   0.82.
# v4 and v5p take v5e's ICI figure, tpu7x v6e's (the family rule above); DCN stays at its rated
# figure on v4, v5p and v5e.
V6E_ICI_EFFICIENCY = 3.35 / 5.12
V6E_DCN_EFFICIENCY = 24.2 / 73.7
ICI_EFFICIENCY = 560 / 680


CHIPS = {
    # v4: 275 TFLOP/s, 32 GiB at 1.2 TB/s; ICI 4.5e10 B/s one way per link, 6 links; slices of
    # whole 4x4x4 cubes are tori (optical switches close the rings); DCN 25 GB/s per 4-chip host.
    "v4": Chip("v4", 275e12, 32 * GIB, 1.2e12, 4.5e10, 6, 3, 4, False, 6.25e9,
               mxu_efficiency=MXU_EFFICIENCY, ici_efficiency=ICI_EFFICIENCY),
    # v5p: 459 TFLOP/s, 95 GiB at 2.76 TB/s; ICI 9e10 B/s one way per link, 6 links (4,800 Gbps
    # per chip, Google); wrap-around on cube-multiple axes as v4; DCN 50 Gbps per chip.
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2.765e12, 9e10, 6, 3, 4, False, 6.25e9,
               mxu_efficiency=MXU_EFFICIENCY, ici_efficiency=ICI_EFFICIENCY),
    # v5e: 197 TFLOP/s, 16 GiB at 819 GB/s; ICI 4.5e10 B/s one way per link (1,600 Gbps per
    # chip), 4 links, 2-D; only the full 16-chip axis of a 16x16 pod wraps; DCN 25 Gbps per chip.
    "v5e": Chip("v5e", 197e12, 16 * GIB, 8.19e11, 4.5e10, 4, 2, 16, True, 3.125e9,
               mxu_efficiency=MXU_EFFICIENCY, ici_efficiency=ICI_EFFICIENCY),
    # v6e (Trillium): 918 TFLOP/s, 32 GiB at 1.64 TB/s; ICI 9e10 B/s one way per link (3,584 Gbps
    # per chip), 4 links, 2-D, wraps as v5e; DCN 100 Gbps per chip.
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1.64e12, 9e10, 4, 2, 16, True, 1.25e10,
               mxu_efficiency=V6E_MXU_EFFICIENCY, host_bandwidth=V6E_HOST_BANDWIDTH,
               mxu_side=V6E_MXU_SIDE, hbm_efficiency=V6E_HBM_EFFICIENCY,
               ici_efficiency=V6E_ICI_EFFICIENCY, dcn_efficiency=V6E_DCN_EFFICIENCY),
    # tpu7x (Ironwood), per device = half a chip: 2307/2 TFLOP/s, 192/2 GiB at 7380/2 GB/s;
    # the chip's ICI (1200 GB/s bidirectional, as v5p's: 6 links of 9e10 B/s one way, a 3-D
    # torus of 4x4x4 cubes that wraps as v5p's) and its DCN (100 Gbps) and PCIe are shared by
    # its two devices, which run the same program at once: half of each link per device.
    "tpu7x": Chip("tpu7x", 2307e12 / 2, 96 * GIB, 7.38e12 / 2, 9e10 / 2, 6, 3, 4, False,
                  1.25e10 / 2, mxu_efficiency=V6E_MXU_EFFICIENCY,
                  host_bandwidth=HOST_BANDWIDTH / 2, mxu_side=V6E_MXU_SIDE,
                  hbm_efficiency=V6E_HBM_EFFICIENCY, ici_efficiency=V6E_ICI_EFFICIENCY,
                  dcn_efficiency=V6E_DCN_EFFICIENCY),
}
# JAX devices per chip (the model's figures above are per device).
DEVICES_PER_CHIP = {"v4": 1, "v5p": 1, "v5e": 1, "v6e": 1, "tpu7x": 2}


def chip_for(generation: str) -> Chip:
    """The Chip of a generation name ("v5p"); KeyError names the known ones."""
    try:
        return CHIPS[generation]
    except KeyError:
        raise KeyError(f"no chip figures for {generation!r} (known: {', '.join(CHIPS)})") from None


def axis_wraps(chip: Chip, axis_length: int, group_span: int) -> bool:
    """Whether a ring of `group_span` chips along a physical axis of `axis_length` chips can use
    the torus wrap-around link (so both directions of every link carry data)."""
    if group_span != axis_length or axis_length < 3:
        return False  # a sub-ring (or a 2-ring) closes over the far side only through others
    if chip.wrap_needs_full_axis:
        return axis_length == chip.wrap_min_axis
    return axis_length % chip.wrap_min_axis == 0
