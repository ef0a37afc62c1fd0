"""A kept compiled program stands in for a compile only when it was compiled from the same key
(lowered program, flags, start-up flags, topology) by the same compiler (k2jax/aot/program_key.py,
used by benchmarks/calibrate_step_model.py)."""

from __future__ import annotations

import json

from k2jax.aot.program_key import (KEYS_FILE, kept_program, program_key, record_program,
                                   toolchain)

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
