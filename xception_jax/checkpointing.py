"""Checkpoints: orbax CheckpointManager under WORKDIR/checkpoints/<step>/.

Saves are asynchronous (training continues while the arrays are written) and atomic (orbax writes
to a temporary folder and renames it when complete, so a crash mid-save never leaves a half
checkpoint that a restart would pick up; on gs://, where nothing can be renamed, orbax marks a
finished step with commit_success.txt instead). Kept: the latest `checkpoint_keep` steps, plus the
best one by `config.best_metric`: every eval's metrics are saved with its checkpoint (orbax writes
them only when the manager has a `best_fn`), so the best step is still known, and kept, after a
resume. The train state carries everything a resume needs: parameters, optimizer state, EMA, and
the step, from which the data position and the per-step RNG are derived.

Readers (export, init_from, the tests) use `read_state`, which picks `latest`, `best` or a step
among the finished checkpoints and, when a running trainer deletes the one being read (old steps
go as new ones are written), picks again; failures end in one `CheckpointError` line.
"""

from __future__ import annotations

import math
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from xception_jax import paths
from xception_jax import workdir

# The train state is replicated (data parallelism): one replica writes each array. orbax's
# default replica-parallel save slices every array per replica and compiles a slice per shape,
# which costs seconds per save with 8 devices and buys nothing at this state size.
ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


class CheckpointError(ValueError):
  """A checkpoint that cannot be found or read; the message is one line naming it."""


def checkpoint_dir(workdir: paths.PathLike) -> paths.Path:
  return paths.resolve(workdir) / "checkpoints"


def best_mode(metric: str) -> str:
  """'min' for losses, 'max' for accuracies and MAP."""
  return "min" if metric.rsplit("/", 1)[-1].endswith("loss") else "max"


def _metric_fn(metric: str, mode: str):
  missing = -math.inf if mode == "max" else math.inf  # a checkpoint without it is never best
  return lambda metrics: float(metrics.get(metric, missing))


def create_manager(
  workdir: paths.PathLike, *, keep: int, best_metric: str, read_only: bool = False
) -> ocp.CheckpointManager:
  """A manager that keeps the last `keep` checkpoints and the best one by `best_metric`.

  `best_fn` makes orbax write the metrics passed to `save` into each step (`metrics/`), which is
  what lets the best step survive a resume; the preservation policy keeps the latest `keep`
  steps (metrics or not) and the single best one.
  """
  mode = best_mode(best_metric)
  get_metric = _metric_fn(best_metric, mode)
  policy = checkpoint_managers.AnyPreservationPolicy(
    [
      checkpoint_managers.LatestN(n=max(int(keep), 1)),
      checkpoint_managers.BestN(
        get_metric_fn=get_metric, reverse=mode == "min", n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  options = ocp.CheckpointManagerOptions(
    best_fn=get_metric,
    best_mode=mode,
    keep_checkpoints_without_metrics=True,
    preservation_policy=None if read_only else policy,
    enable_async_checkpointing=not read_only,
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state",))


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, metrics: dict[str, float] | None = None
) -> None:
  """Starts an asynchronous save of `state` at `step`, with the eval metrics when there are any."""
  metrics = {k: float(v) for k, v in (metrics or {}).items()} or None
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), metrics=metrics, force=True
  )


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[Any, int] | None:
  """Restores the newest checkpoint into `abstract_state`'s structure and shardings, or None."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  )
  logging.info("Resumed from %s at step %d.", manager.directory, step)
  return restored["state"], step


def finished_steps(directory: paths.PathLike) -> list[int]:
  """The steps in a checkpoints/ folder whose save completed (renamed, or committed on gs://)."""
  try:
    return workdir.finished_steps_in(directory)
  except FileNotFoundError:  # a step deleted while listed: list again
    return workdir.finished_steps_in(directory)


def _locate(path: paths.PathLike, step: int | str | None) -> tuple[paths.Path, int | str]:
  """(checkpoints folder, step request) from a workdir, a checkpoints/ or a step folder."""
  path = paths.resolve(path)
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", "latest" if step is None else step
  if path.name.isdigit() and step is None:
    return path.parent, int(path.name)
  if not path.is_dir():
    raise CheckpointError(f"No checkpoints at {path}: expected a workdir with checkpoints/<step>/.")
  return path, "latest" if step is None else step


def _best_step(directory: paths.Path, best_metric: str) -> int | None:
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # a read-only manager warns that it is read-only
  try:
    manager = create_manager(directory.parent, keep=1, best_metric=best_metric, read_only=True)
  finally:
    logging.set_verbosity(verbosity)
  try:
    with_metrics = [s for s in manager.all_steps() if manager.metrics(s)]
    return manager.best_step() if with_metrics else None
  finally:
    manager.close()


def _pick(
  directory: paths.Path, request: int | str, steps: list[int], best_metric: str | None
) -> int:
  where = f"{directory}"
  if not steps:
    raise CheckpointError(
      f"No checkpoint in {where} yet: the run writes the first one at its first "
      "checkpoint_every_steps, eval or preemption step."
    )
  if request == "latest":
    return steps[-1]
  if request == "best":
    if not best_metric:
      raise CheckpointError(f"--checkpoint=best needs the run's best_metric (run.json of {where}).")
    best = _best_step(directory, best_metric)
    if best is None:
      raise CheckpointError(
        f"No checkpoint in {where} has eval metrics yet, so none is 'best' by {best_metric}; "
        f"use --checkpoint=latest or a step of {steps}."
      )
    return best
  if request not in steps:
    raise CheckpointError(
      f"No checkpoint step {request} in {where}; available steps: {steps} "
      "(or --checkpoint=latest / best)."
    )
  return int(request)


def read_state(
  path: paths.PathLike,
  step: int | str | None = None,
  *,
  best_metric: str | None = None,
  attempts: int = 5,
) -> tuple[dict[str, Any], int]:
  """Reads a saved train state as a tree of numpy arrays, on any number of devices.

  Args:
    path: a run's workdir, its checkpoints/ folder, or one step folder.
    step: an int, 'latest' (default) or 'best' (by `best_metric`, required then).
    best_metric: the metric that defines 'best', e.g. 'eval/ema_top1'.
    attempts: how often to pick again when a running trainer deletes the step being read.

  No target structure is needed, so this works for a run of another model or device count.
  Raises CheckpointError (one line) when no such checkpoint exists or it cannot be read.
  """
  directory, request = _locate(path, step)
  if isinstance(request, str) and request.isdigit():
    request = int(request)
  failed_intact = None  # a step that failed to read although nothing was deleting it
  for attempt in range(attempts):
    chosen = _pick(directory, request, finished_steps(directory), best_metric)
    item_dir = directory / str(chosen) / "state"
    try:
      checkpointer = ocp.PyTreeCheckpointer()
      tree = checkpointer.metadata(item_dir).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
      return restored, int(chosen)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore, orbax: no common type)
      # A trainer deleting this step removes its files one by one before the folder leaves the
      # listing, so a read can fail while the step still looks complete. Wait for a deletion in
      # progress to finish before judging; only a step that fails twice and is still there
      # after each wait is unreadable.
      time.sleep(0.2 * (attempt + 1))
      still_there = chosen in finished_steps(directory) and item_dir.exists()
      if still_there and failed_intact == chosen:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(
          f"Cannot read checkpoint step {chosen} in {directory}: {type(e).__name__}: {reason}"
        ) from None
      if not still_there and isinstance(request, int):
        raise CheckpointError(
          f"Checkpoint step {chosen} in {directory} was deleted while it was read (the run "
          "keeps only its latest checkpoint_keep steps and the best); pick another with "
          f"--checkpoint=latest, best or one of {finished_steps(directory)}."
        ) from None
      failed_intact = chosen if still_there else None
      logging.info(
        "Checkpoint step %s changed while it was read (%s); picking again.",
        chosen,
        type(e).__name__,
      )
  raise CheckpointError(
    f"Checkpoints in {directory} kept changing while they were read "
    f"({attempts} attempts); try again, or stop the run first."
  )


def load_variables(
  path: paths.PathLike,
  step: int | str | None = None,
  *,
  use_ema: bool = False,
  best_metric: str | None = None,
) -> dict[str, Any]:
  """{'params', 'batch_stats', 'step'} of a saved run as numpy arrays.

  `use_ema` picks the Polyak-averaged weights (what evaluation and export use).
  """
  state, step = read_state(path, step, best_metric=best_metric)
  prefix = "ema_" if use_ema else ""
  return {
    "params": state[prefix + "params"],
    "batch_stats": state[prefix + "batch_stats"],
    "step": step,
  }
