"""Where k2jax's files live: a local path or a remote URL (`gs://bucket/key`, or any fsspec URL
for reads), and the one place that knows how to talk to the remote side.

  remote         the backend instance, ranged reads, object versions, listing, whole-or-nothing
                 uploads, bucket checks, copying and removing trees (any fsspec URL; gs:// first)
  ranged_reader  a remote object as a seekable binary file made of ranged GETs
  gcs_objects    what a run directory needs beyond files, GCS only: generation-conditional
                 writes and deletes (the run_dir lock), compose-append (logs)

Local files keep going to the OS (k2jax/atomic_write.py writes them; k2jax/files.py reads the
small ones, local or remote)."""

from __future__ import annotations


def is_remote(path: object) -> bool:
    """A URL (`gs://...`, `memory://...`) rather than a local path."""
    return "://" in str(path)
