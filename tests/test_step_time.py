"""The step-time model (k2jax/aot/step_time.py, op_cost.py, loop_trips.py, collectives.py,
hlo_text.py) on handwritten HLO:
FLOPs and bytes per op, loop trip counts, replica-group spellings, ring costs, overlap."""

from __future__ import annotations

import dataclasses

import pytest

from k2jax.aot.chips import CHIPS, axis_wraps
from k2jax.aot.collectives import DeviceLayout, collective_seconds
from k2jax.aot.hlo_text import parse_module, replica_groups
from k2jax.aot.loop_trips import trip_count
from k2jax.aot.op_cost import attention_kernel_flops
from k2jax.aot.step_time import StepTimeModel, predict

V5P = CHIPS["v5p"]
# 4 chips on a line along x (no wrap-around: a 4-chip v5p axis in a 4x1x1 slice would wrap, so
# use 2x2x1, whose axes of 2 never do).
LAYOUT = DeviceLayout.grid((2, 2, 1))

MATMUL = """
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[128,256], param_1: bf16[256,512]) -> bf16[128,512] {
  %param_0 = bf16[128,256]{1,0} parameter(0)
  %param_1 = bf16[256,512]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,512]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], bf16[128,256], bf16[256,512])) -> (s32[], bf16[128,256], bf16[256,512]) {
  %p = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[128,256]{1,0} get-tuple-element(%p), index=1
  %w = bf16[256,512]{1,0} get-tuple-element(%p), index=2
  %f = bf16[128,512]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%next, %x, %w)
}

%cond (p: (s32[], bf16[128,256], bf16[256,512])) -> pred[] {
  %p = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[128,256], b: bf16[256,512]) -> bf16[256,512] {
  %a = bf16[128,256]{1,0} parameter(0)
  %b = bf16[256,512]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%zero, %a, %b)
  %loop = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[256,512]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_dot_flops_times_trip_count():
    step = StepTimeModel(parse_module(MATMUL), V5P, LAYOUT).step()
    flops = 2 * 128 * 512 * 256
    assert step.flops == 7 * flops
    # bytes: both operands read, the result written, per trip (the add is 12 bytes of s32).
    fused_bytes = 2 * (128 * 256 + 256 * 512 + 128 * 512)
    assert step.hbm_bytes == pytest.approx(7 * (fused_bytes + 12))
    # This small matmul is HBM-bound on v5p: 33.5 MFLOP / 459 T < 0.36 MB / 2.765 TB/s.
    assert step.compute_seconds == 0
    assert step.memory_seconds == pytest.approx(7 * (fused_bytes + 12) / V5P.hbm_achieved)
    assert step.seconds == pytest.approx(step.memory_seconds)


def test_trip_count_follows_the_counter_step_and_start():
    # XLA's windowed-einsum loops count i = 0, 2, 4, 6 < 8: 4 trips, not 8.
    text = MATMUL.replace("constant(7)", "constant(8)").replace(
        "%one = s32[] constant(1)", "%one = s32[] constant(2)")
    assert StepTimeModel(parse_module(text), V5P, LAYOUT).step().flops == 4 * 2 * 128 * 512 * 256
    started = text.replace("%zero = s32[] constant(0)", "%zero = s32[] constant(2)")
    assert StepTimeModel(parse_module(started), V5P, LAYOUT).step().flops == 3 * 2 * 128 * 512 * 256


def test_a_counter_starting_at_a_copied_constant_counts_from_it():
    """A peeled loop (its first iteration moved out) starts its counter at copy(constant(1))."""
    peeled = MATMUL.replace(
        "%init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%zero, %a, %b)",
        "%one = s32[] constant(1)\n  %start = s32[] copy(%one)\n"
        "  %init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%start, %a, %b)")
    module = parse_module(peeled)
    entry = module[module.entry]
    assert trip_count(module, entry.by_name["loop"], entry) == 6


def test_known_trip_count_wins_over_the_condition():
    text = MATMUL.replace("condition=%cond, body=%body",
                          'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"80"}}')
    assert StepTimeModel(parse_module(text), V5P, LAYOUT).step().flops == 80 * 2 * 128 * 512 * 256



def test_layer_extrapolation_costs_and_names_each_scan_of_the_compiled_trip_count():
    # A 2-layer compile costed at 32 layers: the loop of 2 trips runs 32 times, and predict
    # says how many loops it extrapolated (the calibration needs the forward and backward scan:
    # XLA unrolled the backward one in a 2-layer multi-slice compile).
    two = _layer_body(MATMUL.replace("constant(7)", "constant(2)"))
    out = predict(two, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(2, 32))
    assert out["hlo_flops_per_chip"] == 32 * 2 * 128 * 512 * 256
    assert out["extrapolated_layer_loops"] == 1
    assert "extrapolated_layer_loops" not in predict(two, V5P, LAYOUT, 1.0, chips=4)
    # A second loop of the compiled trip count (the backward scan) is a second one.
    both = two.replace(
        "ROOT %out = bf16[256,512]{1,0} get-tuple-element(%loop), index=2",
        "%loop2 = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) while(%loop), "
        "condition=%cond, body=%body\n"
        "  ROOT %out = bf16[256,512]{1,0} get-tuple-element(%loop2), index=2")
    out = predict(both, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(2, 32))
    assert out["extrapolated_layer_loops"] == 2
    assert out["hlo_flops_per_chip"] == 2 * 32 * 2 * 128 * 512 * 256
    # A loop of the same trip count that does not run the layer (the chunked loss's loop over
    # its chunks) keeps its trips.
    chunks = MATMUL.replace("constant(7)", "constant(2)")
    out = predict(chunks, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(2, 32))
    assert out["extrapolated_layer_loops"] == 0
    assert out["hlo_flops_per_chip"] == 2 * 2 * 128 * 512 * 256
    # ... also when XLA sank a constant it shares with the layer into it, under the layer's
    # name (the chunked loss's backward loop of Llama 3.1 8B on v6e-64, libtpu 0.0.42.1).
    sunk = chunks.replace("%one = s32[] constant(1)", '%one = s32[] constant(1), metadata={'
                          'op_name="jit(step)/transpose(jvp(KModel))/while/body/closed_call/'
                          'checkpoint/layers/attention/dot_general"}', 1)
    assert "layers/attention" in sunk
    out = predict(sunk, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(2, 32))
    assert out["extrapolated_layer_loops"] == 0


# A layer scan of 2 trips whose body runs a loop of 2 trips of the layer's matmul (a windowed
# einsum inside the layer): MATMUL's loop becomes the inner one.
_OUTER_BODY = """
%outer_body (p: (s32[], bf16[128,256], bf16[256,512])) -> (s32[], bf16[128,256], bf16[256,512]) {
  %p = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[128,256]{1,0} get-tuple-element(%p), index=1
  %w = bf16[256,512]{1,0} get-tuple-element(%p), index=2
  %zero = s32[] constant(0)
  %init = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%zero, %x, %w)
  %windowed = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/jvp(KModel)/while/body/closed_call/checkpoint/layers/attention/dot_general"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], bf16[128,256]{1,0}, bf16[256,512]{1,0}) tuple(%next, %x, %w)
}

"""


def _nested() -> str:
    inner = _layer_body(MATMUL.replace("constant(7)", "constant(2)"))
    head, entry = inner.split("ENTRY", 1)
    entry = entry.replace("body=%body", "body=%outer_body").replace("%loop", "%layers")
    return head + _OUTER_BODY.lstrip("\n") + "ENTRY" + entry


def test_a_loop_inside_a_layer_loop_keeps_its_trips():
    """A windowed einsum's loop inside the layer (its ops named under layers/) may have as many
    trips as the compile has layers: only the layer scan around it is extrapolated."""
    model = StepTimeModel(parse_module(_nested()), V5P, LAYOUT, layer_trips=(2, 32))
    assert model.step().flops == 32 * 2 * 2 * 128 * 512 * 256
    assert model.extrapolated_loops == {"layers"}


def _layer_body(text: str) -> str:
    """MATMUL's loop body named as the scanned layer's (op names under while/body/.../layers/)."""
    return text.replace(
        "calls=%fused_dot\n", 'calls=%fused_dot, metadata={op_name="jit(step)/jvp(KModel)/'
        'while/body/closed_call/checkpoint/layers/mlp/dot_general"}\n', 1)

def test_a_layer_scan_with_a_peeled_iteration_runs_the_rest_of_the_layers():
    """XLA peels one backward iteration out of the layer scan of the v6e offloading recipes
    (3 trips in a 4-layer compile): costed at 32 layers, the loop runs 31 times and the peeled
    layer once. A 3-trip loop whose body is not the scanned layer is left alone."""
    layer = _layer_body(MATMUL.replace("constant(7)", "constant(3)"))
    out = predict(layer, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(4, 32))
    assert out["extrapolated_layer_loops"] == 1
    assert out["hlo_flops_per_chip"] == 31 * 2 * 128 * 512 * 256
    other = MATMUL.replace("constant(7)", "constant(3)")
    out = predict(other, V5P, LAYOUT, model_flops_per_step=1.0, chips=4, layer_trips=(4, 32))
    assert out["extrapolated_layer_loops"] == 0
    assert out["hlo_flops_per_chip"] == 3 * 2 * 128 * 512 * 256


SLICED = """
HloModule m, is_scheduled=true

%fused_slice (param_0: f32[80,1024,1024], param_1: s32[]) -> f32[1,1024,1024] {
  %param_0 = f32[80,1024,1024]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,1024,1024]{2,1,0} dynamic-slice(%param_0, %param_1, %z, %z), dynamic_slice_sizes={1,1024,1024}
}

%fused_dus (param_0: f32[80,1024,1024], param_1: f32[1,1024,1024], param_2: s32[]) -> f32[80,1024,1024] {
  %param_0 = f32[80,1024,1024]{2,1,0} parameter(0)
  %param_1 = f32[1,1024,1024]{2,1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[80,1024,1024]{2,1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %z, %z)
}

ENTRY %main (w: f32[80,1024,1024], i: s32[]) -> f32[80,1024,1024] {
  %w = f32[80,1024,1024]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %s = f32[1,1024,1024]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  ROOT %u = f32[80,1024,1024]{2,1,0} fusion(%w, %s, %i), kind=kLoop, calls=%fused_dus
}
"""


def test_sliced_and_in_place_buffers_count_only_the_slice():
    step = StepTimeModel(parse_module(SLICED), V5P, LAYOUT).step()
    layer = 1024 * 1024 * 4
    # slice: reads one layer (+ the s32 index), writes one; update: reads the update (+ index),
    # writes it in place. The 80-layer buffer itself is never streamed.
    assert step.hbm_bytes == pytest.approx(2 * layer + 4 + 2 * layer + 4)


ASYNC = """
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[4096,4096], param_1: bf16[4096,4096]) -> bf16[4096,4096] {
  %param_0 = bf16[4096,4096]{1,0} parameter(0)
  %param_1 = bf16[4096,4096]{1,0} parameter(1)
  ROOT %dot.1 = bf16[4096,4096]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (x: bf16[4096,4096], w: bf16[1024,4096]) -> bf16[4096,4096] {
  %x = bf16[4096,4096]{1,0} parameter(0)
  %w = bf16[1024,4096]{1,0} parameter(1)
  %ags = (bf16[1024,4096]{1,0}, bf16[4096,4096]{1,0}) all-gather-start(%w), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}, use_global_device_ids=true
  %f = bf16[4096,4096]{1,0} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %agd = bf16[4096,4096]{1,0} all-gather-done(%ags)
  ROOT %g = bf16[4096,4096]{1,0} fusion(%f, %agd), kind=kOutput, calls=%fused_dot
}
"""


def test_async_collective_overlaps_the_compute_between_start_and_done():
    step = StepTimeModel(parse_module(ASYNC), V5P, LAYOUT).step()
    matmul = 2 * 4096 ** 3 / (V5P.peak_flops * V5P.mxu_efficiency)
    # all-gather of 32 MiB over 4 chips of a 2x2 (two axes, no wrap-around): 3/4 of the output
    # over 2 one-way links.
    gather = 3 / 4 * 4096 * 4096 * 2 / (2 * V5P.ici_link_achieved)
    assert step.collective_seconds == pytest.approx(gather)
    assert step.compute_seconds == pytest.approx(2 * matmul)
    assert step.exposed_collective_seconds == pytest.approx(max(0.0, gather - matmul))
    assert step.seconds == pytest.approx(2 * matmul + max(0.0, gather - matmul))
    # The same collective run synchronously is exposed whole.
    sync = ASYNC.replace("all-gather-start", "all-gather").replace(
        "(bf16[1024,4096]{1,0}, bf16[4096,4096]{1,0}) all-gather", "bf16[4096,4096]{1,0} all-gather")
    sync = sync.replace("  %agd = bf16[4096,4096]{1,0} all-gather-done(%ags)\n", "").replace(
        "%agd)", "%ags)")
    step = StepTimeModel(parse_module(sync), V5P, LAYOUT).step()
    assert step.exposed_collective_seconds == pytest.approx(gather)


# libtpu's multi-slice compile hands the slice-to-slice stage of a collective to the Megascale
# runtime: a send (this chip's shard) and a recv of one rendezvous; the result is the recv-done's.
MEGASCALE_ATTRS = ('is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
                   '"xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.7_0",'
                   '_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",'
                   '_xla_megascale_transfer_type="ALL_REDUCE"}')
MEGASCALE = f"""
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[4096,4096], param_1: bf16[4096,4096]) -> bf16[4096,4096] {{
  %param_0 = bf16[4096,4096]{{1,0}} parameter(0)
  %param_1 = bf16[4096,4096]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[4096,4096]{{1,0}} dot(%param_0, %param_1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
}}

ENTRY %main (x: bf16[4096,4096], g: f32[1024,4096]) -> bf16[4096,4096] {{
  %x = bf16[4096,4096]{{1,0}} parameter(0)
  %g = f32[1024,4096]{{1,0}} parameter(1)
  %tok = token[] after-all()
  %send = (f32[1024,4096]{{1,0}}, u32[], token[]) send(%g, %tok), channel_id=2, {MEGASCALE_ATTRS}
  %tok2 = token[] after-all()
  %recv = (f32[1024,4096]{{1,0}}, u32[], token[]) recv(%tok2), channel_id=3, {MEGASCALE_ATTRS}
  %f = bf16[4096,4096]{{1,0}} fusion(%x, %x), kind=kOutput, calls=%fused_dot
  %rd = (f32[1024,4096]{{1,0}}, token[]) recv-done(%recv), channel_id=3, is_host_transfer=true
  %sd = token[] send-done(%send), channel_id=2, is_host_transfer=true
  ROOT %h = bf16[4096,4096]{{1,0}} fusion(%f, %f), kind=kOutput, calls=%fused_dot
}}
"""


def test_megascale_send_is_a_dcn_collective_overlapping_until_its_recv_done():
    two_slices = DeviceLayout.grid((2, 2, 1), num_slices=2)
    step = StepTimeModel(parse_module(MEGASCALE), V5P, two_slices).step()
    # all-reduce over 2 slices: 2 x (1/2) of this chip's 16 MiB shard over its DCN egress.
    dcn = 1024 * 4096 * 4 / V5P.dcn_achieved
    matmul = 2 * 4096 ** 3 / (V5P.peak_flops * V5P.mxu_efficiency)
    assert step.collective_seconds == pytest.approx(dcn)
    assert step.collectives == 1
    assert step.exposed_collective_seconds == pytest.approx(max(0.0, dcn - matmul))
    assert step.seconds == pytest.approx(2 * matmul + max(0.0, dcn - matmul))
    # Without compute between the send and the recv-done, all of it is exposed.
    waiting = MEGASCALE.replace("calls=%fused_dot\n  %rd", "calls=%fused_dot\n  %rd0 = token[] "
                                "after-all()\n  %rd")
    waiting = waiting.replace("  %f = bf16[4096,4096]{1,0} fusion(%x, %x), kind=kOutput, "
                              "calls=%fused_dot\n", "").replace("fusion(%f, %f)", "fusion(%x, %x)")
    step = StepTimeModel(parse_module(waiting), V5P, two_slices).step()
    assert step.exposed_collective_seconds == pytest.approx(dcn)

def test_predict_reports_mfu_from_the_predicted_step():
    out = predict(ASYNC, V5P, LAYOUT, model_flops_per_step=4 * 2 * 4096 ** 3, chips=4)
    assert out["predicted_mfu"] == pytest.approx(
        4 * 2 * 4096 ** 3 / (out["predicted_step_seconds"] * 4 * V5P.peak_flops))
    assert out["predicted_step_seconds"] == pytest.approx(
        out["compute_seconds"] + out["memory_seconds"] + out["exposed_collective_seconds"])


def _collective(groups: str, kind: str = "all-reduce", shape: str = "f32[1024,1024]"):
    text = f"""
HloModule m
ENTRY %main (x: {shape}) -> {shape} {{
  %x = {shape}{{1,0}} parameter(0)
  ROOT %c = {shape}{{1,0}} {kind}(%x), channel_id=1, replica_groups={groups}, use_global_device_ids=true
}}
"""
    module = parse_module(text)
    return module[module.entry].root


def test_replica_group_spellings_agree():
    explicit = _collective("{{0,2},{1,3}}")
    iota = _collective("[2,2]<=[2,2]T(1,0)")
    mesh = _collective("mesh['a'=2,'b'=2] {'a'}")
    reordered = _collective("mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}")
    assert replica_groups(explicit, 4) == [[0, 2], [1, 3]]
    assert replica_groups(iota, 4) == [[0, 2], [1, 3]]
    assert replica_groups(mesh, 4) == [[0, 2], [1, 3]]
    assert replica_groups(reordered, 4) == [[0, 2], [1, 3]]
    assert replica_groups(_collective("{}"), 4) == [[0, 1, 2, 3]]


def test_ring_costs_wraparound_and_dcn():
    size = 1024 * 1024 * 4
    v5e = CHIPS["v5e"]
    # A full 16-chip v5e axis wraps (both directions); an 8-chip sub-ring of it does not.
    full = DeviceLayout.grid((16, 16))
    ring16 = _collective("[16,16]<=[16,16]T(1,0)")  # ids 0, 16, 32, ...: the whole y axis
    assert replica_groups(ring16, 256)[0] == [16 * i for i in range(16)]
    seconds = collective_seconds("all-reduce", ring16, size, size, v5e, full)
    assert seconds == pytest.approx(2 * size * 15 / 16 / (2 * v5e.ici_link_achieved))
    half = DeviceLayout.grid((8, 16))
    ring8 = _collective("[16,8]<=[8,16]T(1,0)")
    assert collective_seconds("all-reduce", ring8, size, size, v5e, half) == pytest.approx(
        2 * size * 7 / 8 / v5e.ici_link_achieved)
    assert axis_wraps(V5P, 8, 8) and not axis_wraps(V5P, 2, 2) and not axis_wraps(v5e, 8, 8)
    # reduce-scatter counts its input, all-gather its output.
    gather = collective_seconds("all-gather", ring8, size / 8, size, v5e, half)
    scatter = collective_seconds("reduce-scatter", ring8, size, size / 8, v5e, half)
    assert gather == pytest.approx(scatter) == pytest.approx(size * 7 / 8 / v5e.ici_link_achieved)
    # Two slices of 4 chips: a group of one chip per slice crosses DCN only.
    two = DeviceLayout.grid((2, 2), num_slices=2)
    across = _collective("{{0,4},{1,5},{2,6},{3,7}}")
    assert collective_seconds("all-reduce", across, size, size, v5e, two) == pytest.approx(
        2 * size / 2 / v5e.dcn_achieved)



def test_collective_efficiencies_reproduce_their_measurements():
    """chips.py's ICI/DCN efficiencies are the ratio of a measured collective to this model's
    time for it: with them, the model gives the measured times back."""
    v6e, v5e = CHIPS["v6e"], CHIPS["v5e"]
    # tpu-recipes' trillium collectives run: psum of bf16[17408, 17408] over all of a v6e-256,
    # 235.76 GB/s in its convention (2 x bytes x 255/256 / time).
    pod = DeviceLayout.grid((16, 16))
    size = 17408 * 17408 * 2
    measured = 2 * size * 255 / 256 / 235.76e9
    everyone = _collective("{}")
    assert collective_seconds("all-reduce", everyone, size, size, v6e, pod) == pytest.approx(
        measured, rel=0.01)
    # ... and over DCN between 2 slices, each chip's half with its peer: 4.113 GB/s in its
    # convention (bytes x 1 x 2 / 2 / 2 / time).
    two = DeviceLayout.grid((16, 16), num_slices=2)
    peers = _collective("[256,2]<=[2,256]T(1,0)")
    assert replica_groups(peers, 512)[0] == [0, 256]
    measured = size * (2 - 1) * 2 / 2 / 2 / 4.113e9
    assert collective_seconds("all-reduce", peers, size / 2, size / 2, v6e, two) == \
        pytest.approx(measured, rel=0.01)
    # The JAX scaling book's profiled all-gather of bf16[2048, 8192] over a 4-chip v5e axis
    # without wrap-around (a 4 x 8 slice): 680 us.
    slice_4x8 = DeviceLayout.grid((4, 8))
    column = _collective("[8,4]<=[8,4]", kind="all-gather")
    assert replica_groups(column, 32)[0] == [0, 1, 2, 3]
    total = 2048 * 8192 * 2
    assert collective_seconds("all-gather", column, total / 4, total, v5e, slice_4x8) == \
        pytest.approx(680e-6, rel=0.03)


V6E_MICROBENCHMARKS = """
HloModule m, is_scheduled=true

%fused_dot (param_0: bf16[8192,8192], param_1: bf16[8192,8192]) -> bf16[8192,8192] {
  %param_0 = bf16[8192,8192]{1,0} parameter(0)
  %param_1 = bf16[8192,8192]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8192,8192]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[8192,8192], b: bf16[8192,8192], c: bf16[16777216]) -> (bf16[8192,8192], bf16[16777216]) {
  %a = bf16[8192,8192]{1,0} parameter(0)
  %b = bf16[8192,8192]{1,0} parameter(1)
  %c = bf16[16777216]{0} parameter(2)
  %matmul = bf16[8192,8192]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  %copied = bf16[16777216]{0} copy(%c)
  ROOT %t = (bf16[8192,8192]{1,0}, bf16[16777216]{0}) tuple(%matmul, %copied)
}
"""


def test_v6e_efficiencies_reproduce_the_microbenchmarks():
    """tpu-recipes' v6e-1 microbenchmarks: an (8192)^3 bf16 matmul in 1.3288 ms (827.47
    TFLOP/s) and a copy of 16Mi bf16 elements in 0.04936 ms (1359.6 GB/s read + write)."""
    v6e = CHIPS["v6e"]
    step = StepTimeModel(parse_module(V6E_MICROBENCHMARKS), v6e, DeviceLayout.grid((1, 1))).step()
    assert step.compute_seconds == pytest.approx(2 * 8192 ** 3 / 827.47e12, rel=1e-3)
    assert step.memory_seconds == pytest.approx(2 * 16777216 * 2 / 1359.6e9, rel=1e-3)

def test_attention_kernel_flops_follow_the_causal_blocks():
    text = """
HloModule m
ENTRY %main (q: bf16[8,2048,128], k: bf16[8,2048,128], v: bf16[8,2048,128]) -> bf16[8,2048,128] {
  %q = bf16[8,2048,128]{2,1,0} parameter(0)
  %k = bf16[8,2048,128]{2,1,0} parameter(1)
  %v = bf16[8,2048,128]{2,1,0} parameter(2)
  ROOT %splash_mha_fwd = bf16[8,2048,128]{2,1,0} custom-call(%q, %k, %v), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={"xprof_metadata":"{\\"block_q\\": 512, \\"block_kv\\": 512}"}}
}
"""
    module = parse_module(text)
    entry = module[module.entry]
    # 4 x 4 blocks of 512, causal: 10 of 16 visited.
    assert attention_kernel_flops(entry.root, entry) == pytest.approx(
        4 * 8 * 2048 * 2048 * 128 * 10 / 16)


def test_a_dimension_under_the_mxu_side_fills_part_of_it():
    """v6e's 256x256 array (the scaling book) is half filled by a contraction or stationary
    width of 128; the 128x128 arrays of earlier generations are full. An attention kernel's
    matmuls all carry head_dim, so head_dim 128 runs at half rate on v6e."""
    from k2jax.aot.op_cost import attention_mxu_fill, mxu_fill

    def entry_of(text: str):
        module = parse_module(text)
        return module[module.entry]

    def dot(lhs: str, rhs: str, out: str, dims: str):
        return entry_of(f"""
HloModule m
ENTRY %main (a: bf16[{lhs}], b: bf16[{rhs}]) -> bf16[{out}] {{
  %a = bf16[{lhs}] parameter(0)
  %b = bf16[{rhs}] parameter(1)
  ROOT %d = bf16[{out}] dot(%a, %b), {dims}
}}
""")

    plain = "lhs_contracting_dims={1}, rhs_contracting_dims={0}"
    k128 = dot("4096,128", "128,4096", "4096,4096", plain)
    assert mxu_fill(k128.root, k128, 128) == 1.0 and mxu_fill(k128.root, k128, 256) == 0.5
    # q.k^T with heads as a batch dimension: the contraction is head_dim.
    scores = dot("8,2048,128", "8,2048,128", "8,2048,2048",
                 "lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, "
                 "rhs_contracting_dims={2}")
    assert mxu_fill(scores.root, scores, 256) == 0.5
    # A narrow operand (here the weights' 128 columns) streams while the wide one is held.
    narrow = dot("4096,4096", "4096,128", "4096,128", plain)
    assert mxu_fill(narrow.root, narrow, 256) == 1.0
    # 320 = 256 + 64: two tiles of 256 hold it, 320 / 512 filled.
    odd = dot("4096,320", "320,4096", "4096,4096", plain)
    assert mxu_fill(odd.root, odd, 256) == pytest.approx(320 / 512)

    splash_text = """
HloModule m
ENTRY %main (q: bf16[8,2048,128], k: bf16[8,2048,128]) -> bf16[8,2048,128] {
  %q = bf16[8,2048,128]{2,1,0} parameter(0)
  %k = bf16[8,2048,128]{2,1,0} parameter(1)
  ROOT %splash_mha_fwd = bf16[8,2048,128]{2,1,0} custom-call(%q, %k), custom_call_target="tpu_custom_call"
}
"""
    splash = entry_of(splash_text)
    assert attention_mxu_fill(splash.root, splash, 128) == 1.0
    assert attention_mxu_fill(splash.root, splash, 256) == 0.5
    # The walk charges the padded work: the same kernel takes twice as long on a v6e-sized
    # array as on a full one, everything else equal.
    v6e = CHIPS["v6e"]
    full = dataclasses.replace(v6e, mxu_side=128)
    module = parse_module(splash_text)
    half = StepTimeModel(module, v6e, LAYOUT).step()
    whole = StepTimeModel(module, full, LAYOUT).step()
    assert half.flops == whole.flops > 0
    assert half.compute_seconds == pytest.approx(2 * whole.compute_seconds)


def test_splash_fused_backward_counts_dq_dk_and_dv():
    """splash's fused backward is its dkv kernel writing dq too (partial per kv block, as on
    the v6e recipes' HLO): 10 units, where the dkv-only kernel counts 8."""
    def kernel(results: str) -> float:
        text = f"""
HloModule m
ENTRY %main (q: bf16[2,4,2048,128], k: bf16[2,1,2048,128]) -> bf16[2,1,2048,128] {{
  %q = bf16[2,4,2048,128]{{3,2,1,0}} parameter(0)
  %k = bf16[2,1,2048,128]{{3,2,1,0}} parameter(1)
  ROOT %splash_mha_dkv_no_residuals = {results} custom-call(%q, %k), custom_call_target="tpu_custom_call"
}}
"""
        module = parse_module(text)
        entry = module[module.entry]
        return attention_kernel_flops(entry.root, entry)

    dkv = "(bf16[2,1,2048,128], bf16[2,1,2048,128])"
    fused = "(bf16[2,4,4,2048,128], bf16[2,1,2048,128], bf16[2,1,2048,128])"
    causal = 0.5  # no block sizes recorded
    assert kernel(dkv) == pytest.approx(8 * 2 * 4 * 2048 * 2048 * 128 * causal)
    assert kernel(fused) == pytest.approx(10 * 2 * 4 * 2048 * 2048 * 128 * causal)
    mha_dkv = "(bf16[2,4,2048,128], bf16[2,4,2048,128])"  # dk, dv shaped like q: still 8
    assert kernel(mha_dkv) == pytest.approx(8 * 2 * 4 * 2048 * 2048 * 128 * causal)


def test_windowed_einsum_convolution_counts_only_window_positions_on_the_input():
    # XLA's windowed einsums: a size-16 window over a padded input of size 1, so each output
    # sees 1 of 16 positions (times the size-2 window over 2), not the whole kernel.
    text = """
HloModule m
ENTRY %main (a: bf16[28,2048,2,512,1], b: bf16[16,128,2,512,1]) -> bf16[28,2048,16,128,1] {
  %a = bf16[28,2048,2,512,1]{4,3,2,1,0} parameter(0)
  %b = bf16[16,128,2,512,1]{4,3,2,1,0} parameter(1)
  ROOT %c = bf16[28,2048,16,128,1]{4,3,2,1,0} convolution(%a, %b), window={size=1x16x2 pad=0_0x15_15x0_0 rhs_reversal=0x1x0}, dim_labels=0b2f1_1o2i0->0b1f2
}
"""
    module = parse_module(text)
    entry = module[module.entry]
    from k2jax.aot.op_cost import dot_flops

    assert dot_flops(entry.root, entry) == 2 * 28 * 2048 * 16 * 128 * (512 * 2)


def test_layout_from_devices_reads_coordinates_and_slices():
    class Device:
        def __init__(self, coords, slice_index):
            self.coords, self.slice_index = coords, slice_index

    devices = [Device([x, y, 0], s) for s in range(2) for y in range(2) for x in range(4)]
    layout = DeviceLayout.from_devices(devices)
    assert layout.dims == (4, 2, 1)
    assert layout.slices == (0,) * 8 + (1,) * 8
    assert layout == DeviceLayout.grid((4, 2, 1), num_slices=2)


def test_async_all_reduce_of_a_tuple_counts_every_output():
    text = """
HloModule m, is_scheduled=true
ENTRY %main (a: f32[1024,1024], b: f32[1024,1024]) -> (f32[1024,1024], f32[1024,1024]) {
  %a = f32[1024,1024]{1,0} parameter(0)
  %b = f32[1024,1024]{1,0} parameter(1)
  %ars = (f32[1024,1024]{1,0}, f32[1024,1024]{1,0}) all-reduce-start(%a, %b), channel_id=1, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  ROOT %ard = (f32[1024,1024]{1,0}, f32[1024,1024]{1,0}) all-reduce-done(%ars)
}
"""
    step = StepTimeModel(parse_module(text), V5P, LAYOUT).step()
    both = 2 * 1024 * 1024 * 4
    assert step.collective_seconds == pytest.approx(
        2 * both * 3 / 4 / (2 * V5P.ici_link_achieved))
    assert step.exposed_collective_seconds == pytest.approx(step.collective_seconds)
