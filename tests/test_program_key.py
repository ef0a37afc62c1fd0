"""A kept compiled program stands in for a compile only when it was compiled from the same key
(lowered program, flags, start-up flags, topology) by the same compiler (k2jax/aot/program_key.py,
used by benchmarks/calibrate_step_model.py)."""

from __future__ import annotations

import json
import lzma

import pytest

from k2jax.aot.program_key import (KEYS_FILE, kept_program, program_key, record_program,
                                   toolchain)
from k2jax.errors import UserError

BASE = dict(lowered="module @jit_step {}", xla_flags="--a=1  --b=2", startup_flags="",
            topology="v5p-128", slices=1)


def test_the_key_changes_with_each_input_and_not_with_flag_spacing():
    base = program_key(**BASE)
    assert program_key(**{**BASE, "xla_flags": " --a=1 --b=2 "}) == base
    for change in (dict(lowered="module @jit_step {} "), dict(xla_flags="--a=1"),
                   dict(startup_flags="--xla_sc_disjoint_spmem=false"),
                   dict(topology="v5p-256"), dict(slices=2)):
        assert program_key(**{**BASE, **change}) != base, change


def test_a_program_is_kept_only_for_its_key_and_this_compiler(tmp_path):
    key = program_key(**BASE)
    assert kept_program(str(tmp_path), "p.hlo", key) is None  # nothing recorded
    (tmp_path / "p.hlo").write_text("HloModule p")
    record_program(str(tmp_path), "p.hlo", key)
    assert kept_program(str(tmp_path), "p.hlo", key) == str(tmp_path / "p.hlo")
    assert kept_program(str(tmp_path), "p.hlo", program_key(**{**BASE, "slices": 2})) is None
    keys = json.loads((tmp_path / KEYS_FILE).read_text())
    assert keys["p.hlo"]["toolchain"] == toolchain()
    keys["p.hlo"]["toolchain"] = "jax 0.10.2 + libtpu 0.0.41"  # another compiler's program
    (tmp_path / KEYS_FILE).write_text(json.dumps(keys))
    assert kept_program(str(tmp_path), "p.hlo", key) is None


def test_a_recorded_program_may_be_kept_compressed_and_records_merge(tmp_path):
    key = program_key(**BASE)
    (tmp_path / "p.hlo.xz").write_bytes(b"")
    record_program(str(tmp_path), "p.hlo", key)
    record_program(str(tmp_path), "q.hlo", key)  # another case's entry joins, p's stays
    assert kept_program(str(tmp_path), "p.hlo", key) == str(tmp_path / "p.hlo.xz")
    assert kept_program(str(tmp_path), "q.hlo", key) is None  # recorded, but no file
    assert set(json.loads((tmp_path / KEYS_FILE).read_text())) == {"p.hlo", "q.hlo"}


COMPILED = '''HloModule jit_step, is_scheduled=true

FileNames
1 "{root}/k2jax/model/layers.py"

StackFrames
1 {{file_location_id={line} parent_frame_id=1}}

ENTRY %main (p: f32[8]) -> f32[8] {{
  %p = f32[8]{{0}} parameter(0), metadata={{op_name="p" source_file="{root}/x.py" source_line={line}}}
  ROOT %n = f32[8]{{0}} negate(%p), metadata={{op_name="jit(step)/neg" stack_frame_id=1}}
}}
'''


def test_two_compiles_differing_only_in_where_the_source_was_hold_the_same_program(tmp_path):
    from k2jax.aot.program_key import same_program, without_debug_info

    here = tmp_path / "a.hlo"
    here.write_text(COMPILED.format(root="/work/main", line=169))
    moved = tmp_path / "b.hlo.xz"  # stored compressed, compiled from another folder and line
    moved.write_bytes(lzma.compress(COMPILED.format(root="/tmp/fresh", line=170).encode()))
    assert same_program(str(here), str(moved))
    assert "negate(%p)" in without_debug_info(here.read_text())
    other = tmp_path / "c.hlo"
    other.write_text(COMPILED.format(root="/work/main", line=169).replace("negate", "abs"))
    assert not same_program(str(here), str(other))


def test_a_damaged_keys_file_is_one_line_naming_it(tmp_path):
    (tmp_path / KEYS_FILE).write_text('{"p.hlo": ')
    with pytest.raises(UserError, match=f"{KEYS_FILE}: not a keys file"):
        kept_program(str(tmp_path), "p.hlo", "k")
    (tmp_path / KEYS_FILE).write_text("[]")
    with pytest.raises(UserError, match="expected a JSON object"):
        kept_program(str(tmp_path), "p.hlo", "k")


KERNEL_SOURCE = '''import jax
from jax.experimental import pallas as pl


def _add(x_ref, o_ref):
    o_ref[...] = x_ref[...] + {addend}


def add(x):
    return pl.pallas_call(_add, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
'''


def _lowered_for_tpu(folder, addend="1.0"):
    """A step with a Pallas TPU kernel whose code lies in `folder`, lowered as compile_report
    lowers (the kernel's Mosaic bytecode keeps that path, as it keeps the installed jax's)."""
    import importlib.util

    import jax
    import jax.numpy as jnp

    folder.mkdir()
    (folder / "kernel.py").write_text(KERNEL_SOURCE.format(addend=addend))
    spec = importlib.util.spec_from_file_location(f"kernel_{folder.name}", folder / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32)
    return jax.jit(module.add).trace(x).lower(lowering_platforms=("tpu",)).as_text()


def test_a_kernel_installed_elsewhere_keeps_its_key_and_a_changed_kernel_does_not(tmp_path):
    """CI's clone installs jax into its own .venv: the same step then lowers to a text whose
    kernel bytecode names another path (all 19 stored programs read as stale in CI before)."""
    here = _lowered_for_tpu(tmp_path / "venv")
    elsewhere = _lowered_for_tpu(tmp_path / ".venv-of-a-clone")
    assert here != elsewhere  # the raw text differs by the path inside the kernel's bytecode
    key = lambda lowered: program_key(**{**BASE, "lowered": lowered})  # noqa: E731
    assert key(here) == key(elsewhere)
    assert key(_lowered_for_tpu(tmp_path / "changed", addend="2.0")) != key(here)

