"""Multi-process start-up: JAX's multi-controller runtime on TPU slices, GPU hosts and local CPUs.

Every process runs the same program; `jax.distributed.initialize` connects them through a
coordinator, after which `jax.devices()` lists the devices of all processes and a jitted step over
a global Mesh runs as one computation. Must be called before any other JAX work.
"""

from __future__ import annotations

import os

from absl import logging
import jax


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Connects this process to the others, when the run has several.

  Explicit arguments (from launch/local.sh or a cluster script) win; otherwise JAX's own cluster
  detection handles Cloud TPU slices and SLURM jobs with several tasks. A single process on a
  single machine needs nothing and does nothing.
  """
  if coordinator_address:
    if num_processes <= 0 or process_id < 0:
      raise ValueError(
        "--coordinator_address needs --num_processes (> 0) and --process_id (0..num_processes-1)."
      )
    # CPU devices of different processes exchange collectives through gloo; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _in_multi_task_cluster():
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "Process %d of %d; %d local and %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _in_multi_task_cluster() -> bool:
  """True under SLURM with several tasks or on a multi-worker Cloud TPU VM."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hostnames.split(",") if h]) > 1
