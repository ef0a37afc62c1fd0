"""Multi-host start-up: jax.distributed on TPU pods (automatic) or explicit clusters."""

from __future__ import annotations

import os
from typing import Optional

import jax


def on_multihost_tpu() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, timeout_s: int = 300) -> None:
    """Join the cluster. Explicit flags win; on a multi-host TPU VM JAX finds its peers itself;
    a single process needs nothing."""
    if coordinator_address:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    elif on_multihost_tpu():
        jax.distributed.initialize(initialization_timeout=timeout_s)
