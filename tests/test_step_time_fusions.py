"""The step-time model on fusions (k2jax/aot/op_cost.py, step_time.py), handwritten HLO: a layer
sliced out of stacked activations inside a nested fusion, and a collective carried by a chain
of fusions (XLA's async collective fusion, with MaxText's flags)."""

from __future__ import annotations

import pytest

from k2jax.aot.chips import CHIPS
from k2jax.aot.collectives import DeviceLayout
from k2jax.aot.hlo_text import parse_module
from k2jax.aot.step_time import StepTimeModel

V5P = CHIPS["v5p"]
LAYOUT = DeviceLayout.grid((2, 2, 1))

# The backward scan reads layer i of the forward pass's saved activations [80, 512, 1024]
# through an outer fusion whose nested fusion does the dynamic-slice.
NESTED_SLICE = """
HloModule m, is_scheduled=true

%inner (param_0: bf16[80,512,1024], param_1: s32[], param_2: bf16[512,1024]) -> bf16[512,1024] {
  %param_0 = bf16[80,512,1024]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = bf16[512,1024]{1,0} parameter(2)
  %zero = s32[] constant(0)
  %ds = bf16[1,512,1024]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,512,1024}
  %layer = bf16[512,1024]{1,0} bitcast(%ds)
  ROOT %sum = bf16[512,1024]{1,0} add(%layer, %param_2)
}

%outer (param_0: bf16[80,512,1024], param_1: s32[], param_2: bf16[512,1024]) -> bf16[512,1024] {
  %param_0 = bf16[80,512,1024]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = bf16[512,1024]{1,0} parameter(2)
  %view = bf16[80,512,1024]{2,1,0} bitcast(%param_0)
  %f = bf16[512,1024]{1,0} fusion(%view, %param_1, %param_2), kind=kLoop, calls=%inner
  ROOT %neg = bf16[512,1024]{1,0} negate(%f)
}

ENTRY %main (stack: bf16[80,512,1024], i: s32[], g: bf16[512,1024]) -> bf16[512,1024] {
  %stack = bf16[80,512,1024]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %g = bf16[512,1024]{1,0} parameter(2)
  ROOT %out = bf16[512,1024]{1,0} fusion(%stack, %i, %g), kind=kLoop, calls=%outer
}
"""


def test_a_layer_sliced_in_a_nested_fusion_counts_one_layer_not_the_stack():
    step = StepTimeModel(parse_module(NESTED_SLICE), V5P, LAYOUT).step()
    layer = 512 * 1024 * 2
    # one layer of the stack read, the 4-byte index, g read, the result written
    assert step.hbm_bytes == pytest.approx(layer + 4 + layer + layer)
    # a parameter used whole by the nested fusion still counts whole
    whole = NESTED_SLICE.replace("dynamic-slice(%param_0, %param_1, %zero, %zero), "
                                 "dynamic_slice_sizes={1,512,1024}", "reduce-precision(%param_0)")
    whole = whole.replace("%ds = bf16[1,512,1024]", "%ds = bf16[80,512,1024]")
    step = StepTimeModel(parse_module(whole), V5P, LAYOUT).step()
    assert step.hbm_bytes == pytest.approx(80 * layer + 4 + layer + layer)


# An all-gather (channel 5) carried by the fusions ags -> mid -> agd, with a matmul scheduled
# between them: one collective, overlapping everything from the first fusion to the last.
_GATHER = ("all-gather(%p0), channel_id=5, replica_groups={{0,1,2,3}}, dimensions={0}, "
           "use_global_device_ids=true")
CHAIN = f"""
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[4096,4096], param_1: bf16[4096,4096]) -> bf16[4096,4096] {{
  %param_0 = bf16[4096,4096]{{1,0}} parameter(0)
  %param_1 = bf16[4096,4096]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[4096,4096]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

%ag_start (p0: bf16[1024,4096]) -> bf16[4096,4096] {{
  %p0 = bf16[1024,4096]{{1,0}} parameter(0)
  ROOT %ag.1 = bf16[4096,4096]{{1,0}} {_GATHER}
}}

%ag_mid (p0: bf16[1024,4096], p1: bf16[4096,4096]) -> bf16[4096,4096] {{
  %p0 = bf16[1024,4096]{{1,0}} parameter(0)
  %p1 = bf16[4096,4096]{{1,0}} parameter(1)
  %ag.2 = bf16[4096,4096]{{1,0}} {_GATHER}
  ROOT %m = bf16[4096,4096]{{1,0}} maximum(%ag.2, %p1)
}}

ENTRY %main (w: bf16[1024,4096], x: bf16[4096,4096]) -> bf16[4096,4096] {{
  %w = bf16[1024,4096]{{1,0}} parameter(0)
  %x = bf16[4096,4096]{{1,0}} parameter(1)
  %ags = bf16[4096,4096]{{1,0}} fusion(%w), kind=kCustom, calls=%ag_start
  %f = bf16[4096,4096]{{1,0}} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %agd = bf16[4096,4096]{{1,0}} fusion(%w, %ags), kind=kCustom, calls=%ag_mid
  ROOT %h = bf16[4096,4096]{{1,0}} fusion(%agd, %f), kind=kOutput, calls=%fused_dot
}}
"""


def test_a_collective_carried_by_fusions_counts_once_and_overlaps_its_chain():
    step = StepTimeModel(parse_module(CHAIN), V5P, LAYOUT).step()
    gather = 3 / 4 * 4096 * 4096 * 2 / (2 * V5P.ici_link_achieved)
    assert step.collectives == 1
    assert step.collective_seconds == pytest.approx(gather)
    # exposed: what the gather takes beyond the ops from its first fusion to its last
    ags_s = (1024 * 4096 * 2 + 4096 * 4096 * 2) / V5P.hbm_achieved
    matmul = 2 * 4096 ** 3 / (V5P.peak_flops * V5P.mxu_efficiency)
    agd_s = (1024 * 4096 * 2 + 2 * 4096 * 4096 * 2) / V5P.hbm_achieved
    assert step.exposed_collective_seconds == pytest.approx(
        max(0.0, gather - (ags_s + matmul + agd_s)))
    # Without the matmul in between, the chain hides less of it.
    bare = CHAIN.replace("  %f = bf16[4096,4096]{1,0} fusion(%x, %x), kind=kOutput, "
                         "calls=%fused_dot\n", "").replace("fusion(%agd, %f)", "fusion(%agd, %x)")
    exposed = StepTimeModel(parse_module(bare), V5P, LAYOUT).step().exposed_collective_seconds
    assert exposed == pytest.approx(max(0.0, gather - (ags_s + agd_s)))
    assert exposed > step.exposed_collective_seconds


# XLA's all-reduce-scatter fusion (a gradient reduce-scatter on the v6e recipes' HLO): an
# all-reduce of which each device keeps its dynamic-slice.
REDUCE_SCATTER = """
HloModule m, is_scheduled=true

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: bf16[4096,4096]) -> bf16[4096,1024] {
  %input.1 = bf16[4096,4096]{1,0} parameter(0)
  %all-reduce.1 = bf16[4096,4096]{1,0} all-reduce(%input.1), channel_id=7, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %zero = u32[] constant(0)
  %pid = u32[] partition-id()
  %width = u32[] constant(1024)
  %offset = u32[] multiply(%pid, %width)
  ROOT %ds = bf16[4096,1024]{1,0} dynamic-slice(%all-reduce.1, %zero, %offset), dynamic_slice_sizes={4096,1024}
}

ENTRY %main (g: bf16[4096,4096]) -> bf16[4096,1024] {
  %g = bf16[4096,4096]{1,0} parameter(0)
  ROOT %rs = bf16[4096,1024]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
}
"""


def test_an_all_reduce_scatter_fusion_costs_a_reduce_scatter():
    step = StepTimeModel(parse_module(REDUCE_SCATTER), V5P, LAYOUT).step()
    ring = 3 / 4 * 4096 * 4096 * 2 / (2 * V5P.ici_link_achieved)  # input x (n-1)/n, once
    assert step.collectives == 1
    assert step.collective_seconds == pytest.approx(ring)
