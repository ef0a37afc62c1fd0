"""Compile the complete train step (forward, backward, micro-batch accumulation, AdamW update)
for a TPU slice that is not here, and report per-chip memory, FLOPs and an estimated MFU.

Inputs are ShapeDtypeStructs carrying their shardings: nothing is allocated. The compiler's
cost analysis counts the body of a loop once (not times its trip count), so the FLOPs and
`optimal_seconds` of the scanned 80-layer step would be those of one layer of one micro-batch.
Step FLOPs are therefore measured on two small unrolled compiles of the same micro-batch and
mesh (1 and 2 layers) and extrapolated: flops = A * (f1 + (L - 1) * (f2 - f1)) for L layers
and A micro-batches (the optimizer's few FLOPs per parameter are inside f1 and f2 once per
micro-batch, an over-count below 0.1%). Remat recomputation is included (it is compiled);
collectives are not timed: the estimate is a compute/HBM roofline, an upper bound on MFU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
from etils import epath

from k2jax.aot.compile_failures import OomMemory, oom_bytes, vmem_oom_line
from k2jax.aot.run_estimate import band_fields, format_lines, run_fields, run_steps
from k2jax.aot.topology import Slice
from k2jax.aot.xla_flags import compile_with_flags
from k2jax.atomic_write import write_bytes_atomic
from k2jax.config import Config, resolve_device_batch
from k2jax.errors import UserError
from k2jax.model.attention_core import TPU_DEFAULT_ATTENTION, pallas_interpret
from k2jax.train.flops import attention_flops_per_step, model_flops_per_step
from k2jax.train.setup import build_training_setup


def quiet_libtpu_start(tpu_slice: Slice) -> None:
    """Off a Cloud TPU VM, libtpu asks the VM metadata server for the accelerator type and
    the workers, gets none, and prints start-up errors that are not errors here ('Failed to
    find host bounds for accelerator type', 'E0000 ... unexpected worker hostname'). It reads
    the answers from these variables first, so they are given, before libtpu loads: one host
    of `tpu_slice`'s generation (an accelerator type libtpu knows, e.g. v5p-8, whatever the
    slice was named). They steer libtpu's own start-up only: the compile's target is the
    topology asked for. Values already set are kept, and a TPU VM, whose metadata answers, is
    left alone. (Filtering stderr instead would also hide libtpu's real errors.)"""
    from k2jax.distributed import on_cloud_tpu_vm

    if on_cloud_tpu_vm():
        return
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", f"{tpu_slice.generation.name}-8"),
                        ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
        os.environ.setdefault(name, value)


def topology_devices(tpu_slice: Slice, num_slices: int = 1) -> list:
    # Compiling needs no TPU, so several compiles (tests, a sweep) may share a host: libtpu's
    # one-process lockfile would refuse all but the first.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_libtpu_start(tpu_slice)
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=tpu_slice.topology,
                                             **kwargs).devices)


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _layer_variant(config: Config, layers: int, micro_rows: int) -> Config:
    """The same micro-batch, mesh and remat, `layers` unrolled layers, one accumulation step."""
    model = dataclasses.replace(config.model, num_layers=layers, scan_layers=False)
    data = dataclasses.replace(config.data, global_batch_size=micro_rows,
                               micro_batch_size=micro_rows)
    return dataclasses.replace(config, model=model, data=data)


def step_cost(config: Config, devices: list, micro_rows: int) -> dict:
    """Per-chip compiler FLOPs and optimal seconds of one whole step, extrapolated from 1- and
    2-layer unrolled compiles of one (padded) micro-batch."""
    costs = []
    for layers in (1, 2):
        setup = build_training_setup(_layer_variant(config, layers, micro_rows), devices)
        costs.append(_cost(compile_with_flags(setup.lower(), config.train.xla_flags)))
    layers, accumulation = config.model.num_layers, config.data.accumulation_steps
    out = {}
    for key in ("flops", "optimal_seconds"):
        if key in costs[0] and key in costs[1]:
            one, two = costs[0][key], costs[1][key]
            out[key] = accumulation * (one + (layers - 1) * (two - one))
    return out


def compile_report(config: Config, tpu_slice: Slice, num_slices: int = 1,
                   measure_flops: bool = True, hlo_out: Optional[str] = None) -> dict:
    """Compile for `tpu_slice` (x num_slices) and return the report (see `k2jax aot --help`).

    `model.attention: auto` means what it means on the TPU being planned for (the
    TPU_DEFAULT_ATTENTION kernel), lowered by Mosaic for real (not in interpret mode, as it
    would be on this CPU).
    `hlo_out`: file to write the compiled step's optimized HLO text to (atomically); nothing is
    written when the compiler ran out of HBM (report["hlo_out"] is then None)."""
    with pallas_interpret(False):
        return _compile_report(_planned_attention(config), tpu_slice, num_slices, measure_flops,
                               hlo_out)


def _planned_attention(config: Config) -> Config:
    if config.model.attention != "auto":
        return config
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, attention=TPU_DEFAULT_ATTENTION))


def lowered_text(config: Config, tpu_slice: Slice, num_slices: int = 1) -> str:
    """The train step as `compile_report` hands it to the compiler (StableHLO, before any of
    XLA's passes): with the same compiler and flags, the same text compiles to the same
    program (k2jax/aot/program_key.py)."""
    with pallas_interpret(False):
        return _lowered(_planned_attention(config), tpu_slice, num_slices)[0].as_text()


def _lowered(config: Config, tpu_slice: Slice, num_slices: int):
    """(lowered step, config with its device batch resolved, devices, training setup)."""
    devices = topology_devices(tpu_slice, num_slices)
    config = resolve_device_batch(config, len(devices))  # data.per_device_batch_size, if set
    setup = build_training_setup(config, devices)
    return setup.lower(), config, devices, setup


def _write_hlo(compiled, hlo_out: Optional[str]) -> Optional[str]:
    if hlo_out is None or compiled is None:
        return None
    write_bytes_atomic(epath.Path(hlo_out), compiled.as_text().encode())  # gs://: upload
    return hlo_out


def _compile_report(config: Config, tpu_slice: Slice, num_slices: int,
                    measure_flops: bool, hlo_out: Optional[str] = None) -> dict:
    start = time.perf_counter()
    lowered, config, devices, setup = _lowered(config, tpu_slice, num_slices)
    chips = len(devices)
    state, rows, mesh = setup.abstract_state, setup.padding.padded_rows, setup.mesh
    try:
        compiled = compile_with_flags(lowered, config.train.xla_flags)
    except UserError:
        raise
    except Exception as err:  # the TPU compiler refuses programs that exceed HBM
        required = oom_bytes(str(err))
        if required is None:
            vmem = vmem_oom_line(str(err))
            if vmem is not None:
                raise UserError(vmem) from None
            raise
        compiled = None
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis() if compiled is not None else None

    params_bytes = _shard_bytes(state.params)
    opt_bytes = _shard_bytes(state.opt_state)
    if memory is None:  # out of HBM at compile time: the compiler's own figure
        memory = OomMemory(required)
    # Arguments (state, batch) + outputs not aliased to a donated argument + temporaries.
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    hbm = tpu_slice.generation.hbm_bytes
    peak = tpu_slice.generation.peak_flops
    model_flops = model_flops_per_step(config)
    # No step is faster than the model's FLOPs at peak: the compiler's count can be below
    # them (module docstring), which once printed an MFU of 133%.
    floor_seconds = model_flops / (chips * peak)

    report = {
        "topology": tpu_slice.name, "topology_string": tpu_slice.topology,
        "slices": num_slices, "chips": chips, "mesh": dict(mesh.shape),
        "attention": config.model.attention, "remat": config.model.remat,
        "global_batch_size": config.data.global_batch_size,
        "per_device_batch_size": config.data.per_device_batch_size,
        "micro_batch_size": config.data.micro_batch_size,
        "accumulation_steps": config.data.accumulation_steps,
        "device_batch_rows": rows, "padding_rows": rows - config.data.global_batch_size,
        "seq_len": config.data.seq_len,
        "params_bytes_per_chip": params_bytes, "optimizer_bytes_per_chip": opt_bytes,
        "argument_bytes_per_chip": memory.argument_size_in_bytes,
        "output_bytes_per_chip": memory.output_size_in_bytes,
        "alias_bytes_per_chip": memory.alias_size_in_bytes,
        "temp_bytes_per_chip": memory.temp_size_in_bytes,
        "bytes_per_chip": total, "hbm_bytes_per_chip": hbm,
        "hbm_fraction": total / hbm, "fits": compiled is not None and total <= hbm,
        "compiler_oom": compiled is None,
        "compile_seconds": round(compile_seconds, 2),
        "model_flops_per_step": model_flops, "peak_flops_per_chip": peak,
        "model_flops_floor_seconds": floor_seconds,
        # None when the compiler ran out of HBM (no program to time); else the model's.
        "predicted_step_seconds": None, "predicted_mfu": None,
        "flops_per_step": None, "estimated_step_seconds": None, "estimated_mfu": None,
        "step_time_source": None,
        "gradient_dtype": config.train.gradient_dtype,
        "xla_flags": config.train.xla_flags,
        # Read by libtpu once, at start-up; train.xla_flags wins for the flags it names.
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS"),
        "hlo_out": _write_hlo(compiled, hlo_out),
    }
    if compiled is not None:  # the step-time model (k2jax/aot/step_time.py) walks its HLO
        from k2jax.aot.step_time import predict_compiled

        report.update(predict_compiled(compiled, mesh, tpu_slice.generation.name, model_flops))
        step = report.get("predicted_step_seconds")
        if step:  # the step-time model sees the HLO's FLOPs
            report["predicted_mfu"] = model_flops / (max(step, floor_seconds) * chips * peak)
            # MaxText's 2024-05..2025-07 convention (full attention), to compare like for like.
            report["predicted_mfu_full_attention"] = report["predicted_mfu"] * (
                1 + attention_flops_per_step(config) / model_flops)
            report.update(band_fields(step, report["predicted_mfu"], tpu_slice.generation.name))
            report.update(run_fields(run_steps(config.train.steps, config.train.start_step),
                                     step, report["predicted_step_band_seconds"], chips))
    if measure_flops and compiled is not None:
        start = time.perf_counter()
        cost = step_cost(config, devices, setup.padding.micro_rows)
        report["cost_compile_seconds"] = round(time.perf_counter() - start, 2)
        flops = cost.get("flops")
        if flops is not None:
            report["flops_per_step"] = flops * chips  # cost analysis is per chip
        seconds: Optional[float] = cost.get("optimal_seconds")
        source = "optimal_seconds"
        if not seconds or seconds <= 0:
            seconds, source = (flops / peak if flops else None), "flops/peak"
        if seconds and seconds < floor_seconds:
            seconds, source = floor_seconds, f"model FLOPs at peak ({source} was less)"
        if seconds:
            report["estimated_step_seconds"] = seconds
            report["step_time_source"] = source
            report["estimated_mfu"] = model_flops / (seconds * chips * peak)
    return report


COMPILER_COUNT_NOTE = ("the compiler does not see inside Pallas/Mosaic kernels, e.g. splash "
                       "or flash attention, and does count remat recompute, which MFU leaves "
                       "out")


def _per_device(report: dict) -> str:
    per_device = report.get("per_device_batch_size")
    return "" if per_device is None else f" ({per_device} per device x {report['chips']})"


def format_report(report: dict) -> str:
    gib = lambda b: f"{b / 1024 ** 3:.2f} GiB"
    lines = [
        f"{report['topology']} ({report['topology_string']} x {report['slices']} slice(s), "
        f"{report['chips']} chips), mesh {report['mesh']}, remat {report['remat']}, "
        f"attention {report['attention']}",
        f"batch {report['global_batch_size']}{_per_device(report)} x {report['seq_len']} in "
        f"{report['accumulation_steps']} micro-batch(es) of {report['micro_batch_size']} "
        f"(+{report['padding_rows']} zero-mask padding rows on the devices)",
        f"per chip: parameters {gib(report['params_bytes_per_chip'])}, optimizer state "
        f"{gib(report['optimizer_bytes_per_chip'])}, temporaries "
        f"{gib(report['temp_bytes_per_chip'])}",
        f"per chip total {gib(report['bytes_per_chip'])} of {gib(report['hbm_bytes_per_chip'])} "
        f"HBM ({report['hbm_fraction']:.0%}): {'FITS' if report['fits'] else 'DOES NOT FIT'}",
        f"compile {report['compile_seconds']:.1f} s",
    ]
    if report["flops_per_step"] is not None:
        lines.append(f"model FLOPs/step {report['model_flops_per_step']:.4g} (MFU's), "
                     f"compiler's count {report['flops_per_step']:.4g} (" + COMPILER_COUNT_NOTE
                     + ")")
    if report["estimated_step_seconds"] is not None:
        lines.append(f"estimated step {report['estimated_step_seconds']:.3f} s "
                     f"({report['step_time_source']}), estimated MFU "
                     f"{report['estimated_mfu']:.1%} (no communication time: an upper bound)")
    if report.get("predicted_step_seconds") is not None:
        lines.append(f"predicted step {report['predicted_step_seconds']:.3f} s = compute "
                     f"{report['compute_seconds']:.3f} + HBM-bound {report['memory_seconds']:.3f}"
                     f" + exposed collectives {report['exposed_collective_seconds']:.3f} (of "
                     f"{report['collective_seconds']:.3f})"
                     + (f" + exposed host transfers {report['exposed_host_transfer_seconds']:.3f}"
                        f" (of {report['host_transfer_seconds']:.3f})"
                        if report.get("host_transfer_seconds") else "")
                     + f", predicted MFU "
                     f"{report['predicted_mfu']:.1%} (step-time model, docs/performance.md)")
    lines.extend(format_lines(report))  # the calibration band, the run's days
    return "\n".join(lines)


_oom_bytes = oom_bytes  # the older private name (tests/test_aot.py)
