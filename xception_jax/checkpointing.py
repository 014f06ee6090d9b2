"""Checkpoints: orbax CheckpointManager under WORKDIR/checkpoints/<step>/.

Saves are asynchronous (training continues while the arrays are written) and atomic (orbax writes
to a temporary folder and renames it when complete, so a crash mid-save never leaves a half
checkpoint that a restart would pick up). Kept: the latest `checkpoint_keep` steps, plus the best
one by the eval metric. The train state carries everything a resume needs: parameters, optimizer
state, EMA, and the step, from which the data position and the per-step RNG are derived.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


# The train state is replicated (data parallelism): one replica writes each array. orbax's
# default replica-parallel save slices every array per replica and compiles a slice per shape,
# which costs seconds per save with 8 devices and buys nothing at this state size.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def create_manager(workdir: str, *, keep: int, best_metric: str,
                   best_mode: str = "max") -> ocp.CheckpointManager:
  """A manager that keeps the last `keep` checkpoints and the best one by `best_metric`."""
  policies = [checkpoint_managers.LatestN(n=max(int(keep), 1))]
  if best_metric:
    policies.append(checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric],
        reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=True,
      create=True,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state",))


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` at `step` (with eval metrics for best-keeping)."""
  metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
               metrics=metrics, force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, int] | None:
  """Restores the newest checkpoint into `abstract_state`'s structure and shardings, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  logging.info("Resumed from %s at step %d.", manager.directory, step)
  return restored["state"], step


def read_state(path: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Reads a saved train state as a tree of numpy arrays, on any number of devices.

  `path` is a run's workdir, its checkpoints/ folder, or one step folder; `step` defaults to the
  newest. No target structure is needed, so this works for a run of another model or device count.
  """
  path = os.path.abspath(path).rstrip("/")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  elif os.path.basename(path).isdigit() and step is None:
    path, step = os.path.dirname(path), int(os.path.basename(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoints at {path!r}: expected a workdir with checkpoints/<step>/.")
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit())
  step = steps[-1] if (step is None and steps) else step
  if step is None or step not in steps:
    raise FileNotFoundError(f"No checkpoint step {step} in {path!r}; available steps: {steps}.")
  item_dir = os.path.join(path, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(item_dir).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return restored, int(step)


def load_variables(path: str, step: int | None = None, *, use_ema: bool = False) -> dict[str, Any]:
  """{'params', 'batch_stats', 'step'} of a saved run as numpy arrays.

  `use_ema` picks the Polyak-averaged weights (what evaluation and export use).
  """
  state, step = read_state(path, step)
  prefix = "ema_" if use_ema else ""
  return {"params": state[prefix + "params"], "batch_stats": state[prefix + "batch_stats"],
          "step": step}
