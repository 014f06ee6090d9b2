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
  logging.info("Resumed from %s at step %d.", checkpoint_dir_of(manager), step)
  return restored["state"], step


def checkpoint_dir_of(manager: ocp.CheckpointManager) -> str:
  return str(manager.directory)


def load_variables(path: str, step: int | None = None, *, use_ema: bool = False) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} of a saved run as numpy arrays (no target structure needed).

  `path` is a run's workdir, its checkpoints/ folder, or one step folder. `use_ema` picks the
  Polyak-averaged weights (what evaluation and export use) instead of the raw ones.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.basename(path.rstrip("/")).isdigit() and step is None:
    step = int(os.path.basename(path.rstrip("/")))
    path = os.path.dirname(path.rstrip("/"))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoints at {path!r}: expected a workdir with checkpoints/<step>/.")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_names=("state",)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(
          f"No checkpoint step {step} in {path!r}; available steps: {list(manager.all_steps())}.")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  prefix = "ema_" if use_ema else ""
  out = {"params": state[prefix + "params"], "batch_stats": state[prefix + "batch_stats"]}
  out = jax.tree.map(np.asarray, out)
  out["step"] = int(step)
  return out
