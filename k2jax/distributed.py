"""Multi-host start-up (jax.distributed), chosen by where the process runs.

- Explicit `--coordinator-address/--num-processes/--process-id` (any cluster, and the
  localhost multi-process tests): joined with those values; on CPU the collectives use gloo.
- A Cloud TPU VM (queued resources, GKE, multi-slice): `jax.distributed.initialize()` with NO
  arguments, always. JAX reads the workers, this host's id and the coordinator from the VM
  metadata server (or GKE's env vars); TPU_WORKER_HOSTNAMES is not set on queued-resource VMs,
  so env vars cannot be the test. The test is the one JAX itself uses: TPU chips on the PCI bus.
- Anything else (one CPU/GPU process): nothing.

A dead peer must end the run, not hang it: the coordination service declares a process dead
after `heartbeat_timeout_s` without heartbeats and every survivor then fails with an error.
K2JAX_HEARTBEAT_TIMEOUT_S overrides the default (tests use a few seconds).
"""

from __future__ import annotations

import os
from typing import Optional

import jax

HEARTBEAT_ENV = "K2JAX_HEARTBEAT_TIMEOUT_S"


def tpu_chips_attached() -> int:
    """TPU chips on this host's PCI bus (0 off TPU), as JAX's own Cloud TPU detection counts."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0]
    except Exception:  # private helper moved or /sys unreadable: assume no TPU
        return 0


def on_cloud_tpu_vm() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return False  # JAX_PLATFORMS=cpu on a TPU VM: a deliberately local CPU run
    return tpu_chips_attached() > 0


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: int = 300,
               heartbeat_timeout_s: Optional[int] = None) -> str:
    """Join the cluster; returns how: "explicit", "cloud-tpu" or "single"."""
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = int(os.environ.get(HEARTBEAT_ENV, "100"))
    if (num_processes is None) != (process_id is None) or (
            (num_processes is not None) != bool(coordinator_address)):
        raise ValueError("coordinator_address, num_processes and process_id go together: "
                         f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id}: expected 0 <= id < num_processes "
                             f"({num_processes})")
        if jax.config.jax_platforms in (None, "", "cpu") and not on_cloud_tpu_vm():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
        return "explicit"
    if on_cloud_tpu_vm():
        jax.distributed.initialize(initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
        return "cloud-tpu"
    return "single"
