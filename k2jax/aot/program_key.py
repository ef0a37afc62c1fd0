"""What a TPU compile is a function of, as one key: a compile may be skipped when a program
compiled from the same key is kept.

A compile's output depends on the lowered program (k2jax's model and step as jax lowered
them: `compile_report.lowered_text`), the compile-time flags, the flags libtpu read at
start-up, the target topology, and the compiler itself (jax and libtpu). The key hashes the
first four; the compiler is kept beside it as the `toolchain`, so that a kept program compiled
by another libtpu reads as "another compiler", not as a changed program. XLA compiles the same
input the same way: every calibration case compiled again gave its kept program but for debug
information (`without_debug_info`), which `as_text()` of the lowered program leaves out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import lzma
import os
import re
from typing import Optional

from k2jax.atomic_write import write_bytes_atomic
from k2jax.errors import UserError

KEYS_FILE = "keys.json"  # in a folder of compiled programs: file name -> its key


def toolchain() -> str:
    """'jax 0.10.2 + libtpu 0.0.42.1': the compiler a program was compiled with."""
    versions = []
    for package in ("jax", "libtpu"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} none")
    return " + ".join(versions)


def program_key(lowered: str, xla_flags: Optional[str], startup_flags: str, topology: str,
                slices: int) -> str:
    digest = hashlib.sha256()
    for part in (without_kernel_locations(lowered), " ".join((xla_flags or "").split()),
                 " ".join(startup_flags.split()), topology, str(slices)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


# A Pallas TPU kernel sits in the program as Mosaic MLIR bytecode, base64 in its custom call's
# backend config ('\22body\22: \22TUzv...' in the lowered text, '"body":"TUzv...' compiled), and
# that bytecode keeps the kernel's source locations: the absolute path of the installed jax,
# which differs between virtual environments (CI's clone has its own .venv), so the same
# program would hash differently in each.
_KERNEL_BODY = re.compile(r'(\\22body\\22: \\22|"body":")([A-Za-z0-9+/]+=*)')


def without_kernel_locations(text: str) -> str:
    """`text` (a lowered or compiled module) with each Mosaic kernel's bytecode replaced by the
    digest of the kernel's text without source locations."""
    return _KERNEL_BODY.sub(lambda match: match.group(1) + _kernel_digest(match.group(2)), text)


@functools.lru_cache(maxsize=None)
def _kernel_digest(body: str) -> str:
    try:
        # jax's own way of reading a kernel back (jax/_src/tpu_custom_call.py); private API
        from jax._src.interpreters import mlir
        from jax._src.lib import tpu
        from jaxlib.mlir import ir

        context = mlir.make_ir_context()
        tpu.register_dialect(context)
        context.allow_unregistered_dialects = True  # serialized kernels use stable_mosaic.* ops
        with context:
            module = ir.Module.parse(base64.b64decode(body))
            text = module.operation.get_asm(enable_debug_info=False)
    except Exception:  # noqa: BLE001 - unreadable (another jax): kept whole, a stale key at worst
        return body
    return "mosaic-sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_keys(folder: str) -> dict:
    path = os.path.join(folder, KEYS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            keys = json.load(f)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not a keys file ({err}); remove it to compile its "
                            f"folder's cases again") from None
    if not isinstance(keys, dict):
        raise UserError(f"{path}: expected a JSON object of file name -> key, found "
                        f"{type(keys).__name__}")
    return keys


def kept_program(folder: str, file_name: str, key: str) -> Optional[str]:
    """The path of `folder`'s `file_name` (or its .xz) when it was compiled from `key` by
    this toolchain, else None."""
    entry = read_keys(folder).get(file_name)
    if not entry or entry.get("program") != key or entry.get("toolchain") != toolchain():
        return None
    for path in (os.path.join(folder, file_name), os.path.join(folder, file_name + ".xz")):
        if os.path.exists(path):
            return path
    return None


def record_program(folder: str, file_name: str, key: str) -> None:
    """Note in `folder`'s keys file that `file_name` was compiled from `key` by this
    toolchain (written atomically: a run stopped midway leaves the file whole)."""
    keys = read_keys(folder)
    keys[file_name] = {"program": key, "toolchain": toolchain()}
    text = json.dumps(keys, indent=1, sort_keys=True) + "\n"
    write_bytes_atomic(os.path.join(folder, KEYS_FILE), text.encode())


# The file, function and stack-frame tables of a module's text ('3 "k2jax/model/layers.py"',
# '17 {file_location_id=2 parent_frame_id=17}') and each op's metadata: where ops came from.
_SOURCE_TABLE_LINE = re.compile(r'^\d+ (?:"[^"]*"|\{[a-z_]+=.*\})$')
_OP_METADATA = re.compile(r", metadata=\{[^}]*\}")


def without_debug_info(hlo_text: str) -> str:
    """A compiled module's text without what only locates its source (line numbers move when
    code is edited or run from another folder, paths with the virtual environment): the program
    itself."""
    lines = (_OP_METADATA.sub("", line)
             for line in without_kernel_locations(hlo_text).splitlines())
    return "\n".join(line for line in lines if line.strip() and not _SOURCE_TABLE_LINE.match(line))


def read_program(path: str) -> str:
    with (lzma.open(path, "rt") if path.endswith(".xz") else open(path)) as f:
        return f.read()


def same_program(path: str, other: str) -> bool:
    """Whether two compiled modules' files (plain or .xz) hold the same program."""
    return without_debug_info(read_program(path)) == without_debug_info(read_program(other))
