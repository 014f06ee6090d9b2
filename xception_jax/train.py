"""The training job, top to bottom: `train_and_evaluate(config, workdir)`.

Reading order: set-up (the model, the mesh, the run's length, weights to start from); the loop
(check the config once, restore first, then train, log, evaluate, checkpoint, stop for
preemption or a NaN); how write failures become one-line errors. What one step does is in
`steps.py` (the train state, the train step, the eval step), what an evaluation reports in
`evaluation.py`, and every config check in `config_check.py`.

Nothing here imports TensorFlow: only the input pipeline does, and only for non-synthetic
datasets.
"""

from __future__ import annotations

from collections.abc import Iterator
import math
import time
from typing import Any

from absl import logging
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from xception_jax import checkpointing
from xception_jax import config_check
from xception_jax import data
from xception_jax import evaluation
from xception_jax import keras_weights
from xception_jax import metric_writer
from xception_jax import optim
from xception_jax import paths
from xception_jax import preemption as preemption_lib
from xception_jax import steps
from xception_jax import versions
from xception_jax import workdir as workdir_lib
from xception_jax.models import create_model


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# Set-up: model, mesh, the run's length, the weights to start from.
# ----------------------------------------------------------------------------------------------


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A (data, model) Mesh over all devices of all processes."""
  n_model = config.mesh.model
  n_data = config.mesh.data if config.mesh.data > 0 else jax.device_count() // n_model
  if n_data * n_model != jax.device_count():
    raise ValueError(
      f"config.mesh: data={config.mesh.data} x model={n_model} must use all "
      f"{jax.device_count()} devices (data=-1 picks the rest)."
    )
  # Auto axes: classic GSPMD propagation from the jit's in/out shardings.
  return jax.make_mesh(
    (n_data, n_model), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )


def load_pretrained(
  config: ml_collections.ConfigDict, model, state: steps.TrainState
) -> steps.TrainState:
  """Starts from `config.init_from`: another run's checkpoint (its EMA weights), a Keras weight
  file (.h5, .weights.h5, .keras) or `keras:NAME` (Keras Applications' ImageNet weights, fetched
  and cached by `keras_weights`).

  Leaves are matched by name and shape; the classifier (whose last dimension is the class count)
  is kept freshly initialised when the class counts differ. Any other mismatch is an error.
  """
  path = config.init_from
  if keras_weights.is_keras_spec(path):
    path = keras_weights.fetch_weights(path)[1]
  if path.endswith((".h5", ".hdf5", ".keras")):
    from xception_jax import convert  # pylint: disable=g-import-not-at-top

    source = convert.from_keras_h5(path, model)
  else:
    source = checkpointing.load_variables(path, use_ema=True)
  num_classes = _num_classes_of(model)
  merged = {}
  for collection in ("params", "batch_stats"):
    target = traverse_util.flatten_dict(jax.device_get(getattr(state, collection)), sep="/")
    loaded = traverse_util.flatten_dict(source.get(collection, {}), sep="/")
    out, skipped = {}, []
    for name, value in target.items():
      if name in loaded and np.shape(loaded[name]) == np.shape(value):
        out[name] = np.asarray(loaded[name], value.dtype)
      elif np.shape(value)[-1:] == (num_classes,):  # the classifier, for another class count
        out[name] = value
        skipped.append(name)
      else:
        got = np.shape(loaded[name]) if name in loaded else "missing"
        raise ValueError(
          f"config.init_from={path!r}: layer {name!r} has shape {got} there but "
          f"{np.shape(value)} in {config.model_name}."
        )
    if skipped:
      logging.warning(
        "init_from: kept the freshly initialised head for %s (class count differs).", skipped
      )
    merged[collection] = traverse_util.unflatten_dict(out, sep="/")
  # Two separate device copies each: the train step donates the state, and the same buffer given
  # twice (as params and as ema_params) makes XLA refuse to run it. np.array copies the host
  # array first, since device_put may alias a numpy array's memory on the CPU instead of copying.
  put = lambda name: jax.device_put(  # noqa: E731
    jax.tree.map(np.array, merged[name]), jax.tree.map(lambda x: x.sharding, getattr(state, name))
  )
  return state.replace(
    params=put("params"),
    batch_stats=put("batch_stats"),
    ema_params=put("params"),
    ema_batch_stats=put("batch_stats"),
  )


def _num_classes_of(model) -> int:
  return int(getattr(model, "num_classes", 0) or 0)


def steps_per_epoch(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> float:
  return info.num_train_examples / config.batch_size


def total_steps(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> int:
  if config.total_steps is not None:
    return int(config.total_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch(config, info)))


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says, resuming from `workdir` if it holds a checkpoint.

  `workdir` may be a local folder or a cloud URL (gs://bucket/run). A workdir that holds another
  config's run, or that a live trainer holds, is refused before anything is written.
  Returns the last metrics written, plus 'step' and 'preempted'.
  """
  # --- Everything that can be wrong is checked here, before any compile or write.
  mesh = make_mesh(config)
  config_check.validate(config, mesh.shape["data"], jax.process_count())
  info = data.dataset_info(config)
  loss_kind = config.loss if config.loss != "auto" else "sigmoid" if info.multi_label else "softmax"
  model = create_model(config, info.num_classes)
  per_epoch = steps_per_epoch(config, info)
  num_steps = total_steps(config, info)
  tx, schedule = optim.create_optimizer(config, per_epoch, num_steps)
  best_metric = evaluation.resolve_best_metric(config, info.multi_label)
  workdir = paths.resolve(workdir)
  resumed = workdir_lib.check_identity(workdir, config)  # reads only

  try:
    paths.makedirs(workdir)
  except OSError as e:
    error = _as_write_error(e, workdir)
    if error is None:
      raise
    raise error from e
  lock = _lock_workdir(workdir)
  preemption = preemption_lib.PreemptionWatcher()  # SIGTERM from here on saves and stops
  manager = writer = None
  try:
    if jax.process_index() == 0:
      workdir_lib.record_config(workdir, config, resumed)

    # --- State: built sharded; then restore-first (a preempted run continues where it stopped).
    state, state_shardings = steps.create_train_state(
      model, tx, config.image_size, mesh, config.seed
    )
    manager = checkpointing.create_manager(
      workdir, keep=config.checkpoint_keep, best_metric=best_metric
    )
    abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpointing.restore_latest(manager, abstract_state)
    if restored is not None:
      state, start_step = restored
    else:
      start_step = 0
      if config.init_from:
        state = load_pretrained(config, model, state)
    _write_run_info(
      workdir, config, info, model, state, per_epoch, num_steps, loss_kind, best_metric
    )

    data_sharding = NamedSharding(mesh, P("data"))
    loss_fn = steps.make_loss_fn(loss_kind, info.num_classes, config.label_smoothing)
    train_step = steps.jit_train_step(
      steps.make_train_step(config, model, tx, schedule, loss_fn, info.multi_label),
      state_shardings,
      mesh,
    )
    eval_step = jax.jit(steps.make_eval_step(model, info.multi_label))

    writer = metric_writer.MetricWriter(workdir, num_steps)
    train_iter: Iterator[data.Batch] = data.create_train_iterator(
      config, info, start_step=start_step, sharding=data_sharding
    )
    last: dict[str, Any] = {}
    pending: list[dict] = []
    step = start_step
    saved_step = restored[1] if restored else None
    preempted = False
    timer = time.time()
    while step < num_steps:
      state, step_metrics = train_step(state, next(train_iter))
      pending.append(step_metrics)
      step += 1
      is_last = step == num_steps

      if step % config.log_every_steps == 0 or is_last:
        _check_finite(state, step, saved_step)
        means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        elapsed = time.time() - timer
        means["train/steps_per_sec"] = len(pending) / elapsed
        means["train/images_per_sec"] = len(pending) * config.batch_size / elapsed
        writer.write(step, means)
        last.update(means)
        pending, timer = [], time.time()

      eval_metrics = None
      if step % config.eval_every_steps == 0 or is_last:
        eval_metrics = evaluation.evaluate(eval_step, state, config, info, data_sharding)
        writer.write(step, eval_metrics)
        last.update(eval_metrics)
        timer = time.time()  # eval time is not training throughput

      # A host-side check every step (no device sync); all processes agree on the step.
      preempted = preemption.should_stop(step, config.log_every_steps) and not is_last
      if step % config.checkpoint_every_steps == 0 or eval_metrics or is_last or preempted:
        _check_finite(state, step, saved_step)
        if lock is not None:
          lock.check()
        checkpointing.save(manager, step, state, eval_metrics)
        saved_step = step
      if preempted:
        logging.warning(
          "Stopped at step %d for preemption; rerun the same command to resume (exit status %d).",
          step,
          preemption_lib.PREEMPTED_EXIT_STATUS,
        )
        break
    manager.wait_until_finished()  # a failed asynchronous save surfaces here
    writer.close()
    writer = None
    if preempted and jax.process_count() > 1:
      multihost_utils.sync_global_devices("xception_jax: saved for preemption")
    return {**last, "step": step, "preempted": preempted}
  except Exception as e:  # pylint: disable=broad-except
    clean = _as_write_error(e, workdir)
    if clean is None:
      raise
    raise clean from None
  finally:
    _close_quietly(manager, writer)
    preemption.close()
    if lock is not None:
      lock.release()


def _close_quietly(manager, writer) -> None:
  """On the way out of an error: finish what can be finished, without a second traceback."""
  for close in ((manager.wait_until_finished, manager.close) if manager else ()) + (
    (writer.close,) if writer else ()
  ):
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning(
        "While stopping: %s: %s", type(e).__name__, (str(e).splitlines() or [""])[0][:300]
      )


def _check_finite(state: steps.TrainState, step: int, saved_step: int | None) -> None:
  bad = int(jax.device_get(state.nonfinite_steps))
  if bad:
    kept = (
      f"the last good checkpoint (step {saved_step}) is intact"
      if saved_step is not None
      else "no checkpoint had been written yet, so there is nothing to resume from"
    )
    raise NonFiniteLossError(
      f"The training loss or gradient was NaN or Inf in {bad} step(s) up to step {step}. The "
      f"run stopped without saving; {kept}. Lower lr.base, enable optimizer.grad_clip_norm, "
      "or use dtype=float32."
    )


def _write_run_info(
  workdir: paths.PathLike,
  config,
  info,
  model,
  state: steps.TrainState,
  per_epoch: float,
  num_steps: int,
  loss_kind: str,
  best_metric: str | None = None,
) -> None:
  """Writes run.json: the values derived at run time, for reports and for people."""
  if jax.process_index() != 0:
    return
  best_metric = best_metric or evaluation.resolve_best_metric(config, info.multi_label)
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  run = {
    "model_name": config.model_name,
    "model_class": type(model).__name__,
    "num_params": count(state.params),
    "num_batch_stats": count(state.batch_stats),
    "dataset": info.name,
    "num_classes": info.num_classes,
    "multi_label": info.multi_label,
    "class_names": list(info.class_names) if info.class_names else None,
    "image_size": config.image_size,
    "num_train_examples": info.num_train_examples,
    "num_eval_examples": info.num_eval_examples,
    "steps_per_epoch": per_epoch,
    "total_steps": num_steps,
    "loss": loss_kind,
    "best_metric": best_metric,
    "best_mode": checkpointing.best_mode(best_metric),
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "platform": jax.devices()[0].platform,
    "device_kind": jax.devices()[0].device_kind,
    **{
      f"{name}_version": version
      for name, version in versions.library_versions(("jax", "flax", "optax")).items()
    },
  }
  paths.write_json(paths.resolve(workdir) / "run.json", run)


# ----------------------------------------------------------------------------------------------
# Write failures (disk full, quota, permissions) as one-line errors; the workdir lock.
# ----------------------------------------------------------------------------------------------


class WriteError(OSError):
  """Writing into the workdir failed (disk full, quota, permissions, storage errors)."""


# What a caller (main.py) reports as one line and exits on, instead of a traceback.
RUN_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError, WriteError)

_WRITE_FAILURES = (
  "No space left",
  "Disk quota",
  "Read-only file system",
  "Permission denied",
  "Input/output error",
  "File too large",
  "ENOSPC",
  "EDQUOT",
)


def _as_write_error(error: BaseException, workdir: paths.Path) -> WriteError | None:
  """A one-line WriteError for a failed write (however deep orbax or tensorstore wrapped it)."""
  chain, seen = [], error
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:
    text = str(e)
    os_error = isinstance(e, OSError) and e.errno is not None
    if not os_error and not any(word in text for word in _WRITE_FAILURES):
      continue
    if os_error:
      cause = f"{e.strerror or e} ({e.filename})" if e.filename else f"{e.strerror or e}"
    else:  # tensorstore: a long status line; keep the part that names the file and the cause
      line = next((l for l in text.splitlines() if any(w in l for w in _WRITE_FAILURES)), text)
      line = line.strip()
      at = min(line.find(w) for w in _WRITE_FAILURES if w in line)
      cause = line if len(line) <= 400 else f"{line[:250]} ... {line[at : at + 120]}"
    checkpoints = checkpointing.checkpoint_dir(workdir)
    try:
      steps = checkpointing.finished_steps(checkpoints)
    except Exception:  # pylint: disable=broad-except  (the storage itself may be failing)
      steps = []
    kept = (
      f"The last complete checkpoint, step {steps[-1]} in {checkpoints}, is intact"
      if steps
      else "No checkpoint had been completed yet"
    )
    return WriteError(
      f"Writing to {workdir} failed: {cause}. {kept}; free space (or fix the "
      "storage) and rerun the same command to resume."
    )
  return None


def _lock_workdir(workdir: paths.Path) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes the workdir lock; every process fails the same way if it cannot."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = workdir_lib.WorkdirLock(workdir)
    try:
      lock.acquire()
    except (workdir_lib.WorkdirError, OSError) as e:
      error, lock = e, None
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = workdir_lib.WorkdirError(
        f"Process 0 could not lock --workdir={workdir}; its log says why."
      )
  if isinstance(error, OSError):
    raise _as_write_error(error, workdir) or error
  if error is not None:
    raise error
  return lock
