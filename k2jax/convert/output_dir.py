"""The converters' output directory, local or gs://, never taken as complete while half-written.

Local: atomic_write.atomic_output_dir (a staging directory renamed into place).
gs://: GCS has no directories and no atomic rename of many objects, so the files are written
in place and completeness is marked by ONE file the readers require, written last by the
converter: `config.json` for a Hugging Face directory (hf_reader and transformers need it),
`k2jax_model.json` for k2jax weights (OrbaxParamsReader and train.init_from need it). A
conversion that fails or is killed leaves no marker; one that fails inside Python also removes
what it wrote. `--force` deletes the old marker first, then the rest, then writes.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from etils import epath

from k2jax.atomic_write import atomic_output_dir, check_output
from k2jax.errors import UserError
from k2jax.storage import is_remote, remote


def check(out: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()):
    """Refuse to overwrite without force, and never to replace (or nest in) an input; returns
    the output path (see `output_path`)."""
    if not is_remote(out):
        return check_output(out, force, inputs)
    text = str(out).rstrip("/")
    if "/" not in text.split("://", 1)[1]:  # --force would empty the whole bucket
        raise UserError(f"{out}: expected a directory inside a bucket (gs://BUCKET/NAME)")
    for source in inputs:
        source_text = str(source).rstrip("/")
        if text == source_text or source_text.startswith(text + "/"):
            raise UserError(f"{out}: the output would replace the input {source}")
    if _has_objects(text) and not force:
        raise UserError(f"{out}: output directory exists; force=True replaces it")
    return epath.Path(text)


def _has_objects(url: str) -> bool:
    try:
        return bool(remote.list_names(url))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, force: bool, marker: str) -> Iterator:
    """Yield the directory to write into; the caller writes `marker` last (see module doc)."""
    if not is_remote(out):
        with atomic_output_dir(out, force) as staging:
            yield staging
        return
    root = check(out, force)
    if _has_objects(str(root)):  # --force: the old marker goes first, so no reader mixes
        (root / marker).unlink(missing_ok=True)
        remote.remove_tree(root)
    try:
        yield root
    except BaseException:
        try:
            remote.remove_tree(root)
        except Exception:  # the first error is the one to report
            pass
        raise
