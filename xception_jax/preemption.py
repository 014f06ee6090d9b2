"""Preemption: SIGTERM means "save a checkpoint and exit with PREEMPTED_EXIT_STATUS".

Clusters announce an eviction with SIGTERM and kill the process a grace period later (SLURM:
30 s by default, `--signal=B:TERM@120` asks for 120 s before the time limit; Cloud TPU VMs: a
maintenance event or a spot/preemptible VM's notice). The train loop asks `should_stop(step)`
after every step:

  * One process: a Python SIGTERM handler sets a flag; reading it costs nothing.
  * Several processes: JAX's own preemption service. `jax.distributed.initialize` starts a
    preemption notifier (it listens for SIGTERM) and a sync manager on every process; when any
    process gets the notice, the processes agree through the coordination service on the next
    safe step (the largest step any of them reached, plus one), and
    `multihost_utils.reached_preemption_sync_point(step)` returns True there on all of them. So
    they save the same step together within a step or two of the signal, even when only one
    process was signalled. No Python SIGTERM handler is installed then: it would replace the
    notifier's.

A run stopped this way exits with PREEMPTED_EXIT_STATUS = 75 (EX_TEMPFAIL in sysexits.h,
"temporary failure; the user is invited to retry"): non-zero, so a scheduler does not mark it
COMPLETED and a script does not go on as if it had finished, and distinct from crashes (1),
bad usage (2) and deaths by signal (128 + n), so launch/slurm.sh requeues the job on exactly this
status and launch/local.sh passes it through.
"""
from __future__ import annotations

import signal

from absl import logging
import jax
from jax._src import distributed as _distributed  # the preemption sync manager's state
from jax.experimental import multihost_utils

PREEMPTED_EXIT_STATUS = 75


class PreemptionWatcher:
  """Turns a preemption notice into a request to save and stop, agreed by all processes."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._use_jax_sync = (jax.process_count() > 1 and
                          getattr(_distributed.global_state, "preemption_sync_manager", None)
                          is not None)
    if self._use_jax_sync:
      return
    if jax.process_count() > 1:
      logging.warning("JAX's preemption service is off (jax_enable_preemption_service): SIGTERM "
                      "is agreed between processes only at log steps.")
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no preemption
      pass

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the current step, then exiting.")
    self.requested = True

  def should_stop(self, step: int, log_every_steps: int) -> bool:
    """True at the step where this run must save and stop. Called after every step."""
    if self._use_jax_sync:
      if multihost_utils.reached_preemption_sync_point(step):
        self.requested = True
        logging.warning("Preemption notice: all processes stop at step %d.", step)
      return self.requested
    if jax.process_count() == 1:
      return self.requested
    if step % log_every_steps:  # fallback without JAX's service: a collective at log steps
      return False
    return bool(multihost_utils.process_allgather(self.requested).any())

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
