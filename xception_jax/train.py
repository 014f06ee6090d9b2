"""The training job, top to bottom: `train_and_evaluate(config, workdir)`.

Reading order: the train state; building it already sharded; the train step (loss, gradients,
optimizer, EMA); the eval step (raw and EMA weights, exact sums over padded batches); the loop
(restore-first start-up, logging, eval, checkpoints, preemption, NaN guard).

Parallelism is data-parallel `jax.jit` over a device Mesh with a 'data' axis (and a 'model' axis
of size 1 kept for later model parallelism): the batch is sharded over 'data', the state is
replicated, and XLA inserts the gradient all-reduce. Because the jitted step sees the global batch,
batch-norm statistics are computed over the global batch (synchronised BN), as in the paper's
synchronous data-parallel training. Nothing here imports TensorFlow: only the input pipeline does,
and only for non-synthetic datasets.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from xception_jax import checkpointing
from xception_jax import data
from xception_jax import keras_weights
from xception_jax import metric_writer
from xception_jax import metrics
from xception_jax import models
from xception_jax import optim
from xception_jax import paths
from xception_jax import preemption as preemption_lib
from xception_jax import workdir as workdir_lib

PyTree = Any


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the run stops and keeps its last good checkpoint."""


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs. Data position and per-step RNG derive from `step`."""
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_batch_stats: PyTree
  nonfinite_steps: jax.Array  # steps with a NaN/Inf loss or gradient; read at log/checkpoint time


# ----------------------------------------------------------------------------------------------
# Set-up: config checks, model, mesh, state.
# ----------------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16")
_LOSSES = ("auto", "softmax", "sigmoid")


def validate_config(config: ml_collections.ConfigDict, num_data_devices: int,
                    process_count: int) -> None:
  """Rejects settings that would fail (or silently misbehave) later, naming the config key."""

  def fail(key: str, message: str):
    raise ValueError(f"config.{key}: {message}")

  if keras_weights.is_keras_spec(config.init_from):  # before any download or compile
    keras_weights.check_model(config.init_from, config.model_name)
  if config.dtype not in _DTYPES:
    fail("dtype", f"{config.dtype!r} is not one of {_DTYPES}.")
  if config.loss not in _LOSSES:
    fail("loss", f"{config.loss!r} is not one of {_LOSSES}.")
  if config.grad_accum_steps < 1:
    fail("grad_accum_steps", f"must be >= 1, got {config.grad_accum_steps}.")
  micro_batch, rest = divmod(config.batch_size, config.grad_accum_steps)
  if config.batch_size <= 0 or rest:
    fail("batch_size", f"{config.batch_size} must be a positive multiple of "
         f"grad_accum_steps={config.grad_accum_steps}.")
  if micro_batch % num_data_devices:
    fail("batch_size", f"{config.batch_size} (micro-batch {micro_batch} with grad_accum_steps="
         f"{config.grad_accum_steps}) must divide evenly over the {num_data_devices} devices of "
         f"the mesh's data axis; valid: multiples of {num_data_devices * config.grad_accum_steps}.")
  if config.batch_size % process_count:
    fail("batch_size", f"{config.batch_size} must divide evenly over {process_count} processes.")
  eval_batch = eval_batch_size(config)
  if eval_batch % num_data_devices or eval_batch % process_count:
    fail("eval_batch_size", f"{eval_batch} must be a multiple of the {num_data_devices} data "
         f"devices and of the {process_count} processes.")
  if config.total_steps is not None and config.total_steps <= 0:
    fail("total_steps", f"must be positive when set, got {config.total_steps}.")
  if config.total_steps is None and config.num_epochs <= 0:
    fail("num_epochs", f"must be positive (or set total_steps), got {config.num_epochs}.")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] <= 0:
      fail(key, f"must be a positive number of steps, got {config[key]}.")
  if not 0.0 <= config.ema.decay < 1.0:
    fail("ema.decay", f"must be in [0, 1), got {config.ema.decay}.")
  if config.checkpoint_keep < 1:
    fail("checkpoint_keep", f"must be >= 1 (the latest steps kept beside the best), got "
         f"{config.checkpoint_keep}.")


def eval_metric_names(multi_label: bool) -> tuple[str, ...]:
  """The metrics `evaluate` reports (raw and EMA weights)."""
  names = ("loss", "precision_at_1", "map100") if multi_label else ("loss", "top1", "top5")
  return tuple(f"eval/{prefix}{name}" for prefix in ("", "ema_") for name in names)


def resolve_best_metric(config: ml_collections.ConfigDict, multi_label: bool) -> str:
  """config.best_metric, defaulting to EMA top-1 (single-label) or EMA MAP@100 (multi-label).

  A loss is minimised, anything else maximised (checkpointing.best_mode).
  """
  default = "eval/ema_map100" if multi_label else "eval/ema_top1"
  metric = config.best_metric or default
  valid = eval_metric_names(multi_label)
  if metric not in valid:
    kind = "multi-label" if multi_label else "single-label"
    raise ValueError(f"config.best_metric={config.best_metric!r}: this {kind} dataset's evals "
                     f"report {', '.join(valid)} (\"\" = {default}).")
  return metric


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return config.eval_batch_size or config.batch_size


def create_model(config: ml_collections.ConfigDict, num_classes: int):
  """The Flax module named by `config.model_name`, with `config.model` as keyword arguments."""
  kwargs = dict(config.model.to_dict())
  for key in ("segments", "group_width"):  # command-line overrides arrive as strings: "4" -> 4
    if isinstance(kwargs.get(key), str) and kwargs[key].isdigit():
      kwargs[key] = int(kwargs[key])
  try:
    return models.create(config.model_name, num_classes=num_classes, dtype=config.dtype, **kwargs)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model_name={config.model_name!r} / config.model={kwargs}: {e}") from e


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A (data, model) Mesh over all devices of all processes."""
  n_model = config.mesh.model
  n_data = config.mesh.data if config.mesh.data > 0 else jax.device_count() // n_model
  if n_data * n_model != jax.device_count():
    raise ValueError(f"config.mesh: data={config.mesh.data} x model={n_model} must use all "
                     f"{jax.device_count()} devices (data=-1 picks the rest).")
  # Auto axes: classic GSPMD propagation from the jit's in/out shardings.
  return jax.make_mesh((n_data, n_model), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def create_train_state(model, tx: optax.GradientTransformation, image_size: int,
                       mesh: jax.sharding.Mesh, seed: int) -> tuple[TrainState, PyTree]:
  """Initialises the state directly into its sharded placement (no host copy of the weights).

  Returns the state and its sharding tree (used by the step's jit and by checkpoint restore).
  """

  def init(rng):
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats,
                      nonfinite_steps=jnp.zeros((), jnp.int32))

  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  lowered = jax.jit(init, out_shardings=shardings).lower(rng)
  # Init runs once; XLA's CPU backend spends ~4x longer optimising its many RNG draws than at
  # level 0, which is most of a small model's start-up time on a laptop.
  options = ({"xla_backend_optimization_level": 0}
             if jax.devices()[0].platform == "cpu" else None)
  state = lowered.compile(compiler_options=options)(rng)
  return state, shardings


# ----------------------------------------------------------------------------------------------
# The steps.
# ----------------------------------------------------------------------------------------------


def make_loss_fn(loss_kind: str, num_classes: int, label_smoothing: float) -> Callable:
  """Per-example loss: softmax cross-entropy (one label) or sigmoid cross-entropy (multi-hot)."""
  if loss_kind == "softmax":
    return lambda logits, labels: metrics.softmax_cross_entropy(
        logits, labels, num_classes, label_smoothing)
  return lambda logits, labels: metrics.sigmoid_cross_entropy(logits, labels, label_smoothing)


def make_train_step(config: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, loss_fn: Callable, multi_label: bool) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); jit it with shardings and donation."""
  base_rng = jax.random.PRNGKey(config.seed)
  accum = config.grad_accum_steps

  def forward(params, batch_stats, images, labels, rng):
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, data.model_input(images), train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    loss = jnp.mean(loss_fn(logits, labels))
    return loss, (logits, mutated["batch_stats"])

  grad_fn = jax.value_and_grad(forward, has_aux=True)

  def train_batch_top1(logits, labels):
    if multi_label:
      top = jnp.argmax(logits, axis=-1)
      return jnp.mean(jnp.take_along_axis(labels, top[:, None], axis=-1))
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(base_rng, state.step)  # per-step randomness: resume-exact
    images, labels = batch["image"], batch["label"]
    if accum == 1:
      (loss, (logits, batch_stats)), grads = grad_fn(
          state.params, state.batch_stats, images, labels, rng)
      top1 = train_batch_top1(logits, labels)
    else:
      # Micro-batch i takes rows i, i+accum, ...: every device keeps its own rows (no reshuffle).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      def micro_step(carry, xs):
        grads_sum, batch_stats, loss_sum, top1_sum = carry
        micro_images, micro_labels, index = xs
        (loss, (logits, batch_stats)), grads = grad_fn(
            state.params, batch_stats, micro_images, micro_labels, jax.random.fold_in(rng, index))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, batch_stats, loss_sum + loss,
                top1_sum + train_batch_top1(logits, micro_labels)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats, loss, top1), _ = jax.lax.scan(
          micro_step, (zeros, state.batch_stats, 0.0, 0.0),
          (split(images), split(labels), jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, top1 = loss / accum, top1 / accum

    grad_norm = optax.global_norm(grads)
    # The loss alone can stay finite while gradients are NaN (XLA's max ignores NaN operands).
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = optim.ema_decay(state.step + 1, config)  # num_updates including this one (TF-Slim)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
        ema_params=optim.ema_update(state.ema_params, params, decay),
        ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, decay),
        nonfinite_steps=state.nonfinite_steps + nonfinite.astype(jnp.int32))
    step_metrics = {"train/loss": loss, "train/lr": schedule(state.step),
                    "train/grad_norm": grad_norm,
                    ("train/precision_at_1" if multi_label else "train/top1"): top1}
    return new_state, step_metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings: PyTree,
                   mesh: jax.sharding.Mesh) -> Callable:
  """Compiles the step as training runs it: batch sharded over 'data', state donated in place."""
  return jax.jit(train_step,
                 in_shardings=(state_shardings, NamedSharding(mesh, P("data"))),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())),
                 donate_argnums=(0,))


def make_eval_step(model, multi_label: bool) -> Callable:
  """Returns eval_step(state, batch, map_states) -> (sums, map_states) for raw and EMA weights.

  Sums (not means) over the real examples of the batch (mask = 1), so the totals over all
  batches are exact whatever the padding of the last one.
  """

  def eval_step(state: TrainState, batch: dict[str, jax.Array], map_states: dict):
    sums = {}
    for prefix, params, batch_stats in (("", state.params, state.batch_stats),
                                        ("ema_", state.ema_params, state.ema_batch_stats)):
      logits = model.apply({"params": params, "batch_stats": batch_stats},
                           data.model_input(batch["image"]), train=False)
      if multi_label:
        counts = metrics.multilabel_counts(logits, batch["label"], batch["mask"])
        map_states = {**map_states, prefix: metrics.map_update(
            map_states[prefix], logits, batch["label"], batch["mask"])}
      else:
        counts = metrics.classification_counts(logits, batch["label"], batch["mask"])
      sums.update({prefix + k: v for k, v in counts.items()})
    return sums, map_states

  return eval_step


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def to_global(batch: dict, sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's part of the batch into one globally sharded array per key."""
  return {k: v if isinstance(v, jax.Array) else
          jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def evaluate(eval_step: Callable, state: TrainState, config: ml_collections.ConfigDict,
             info: data.DatasetInfo, sharding: NamedSharding) -> dict[str, float]:
  """One exact pass over the eval split; returns 'eval/...' metrics for raw and EMA weights."""
  map_states = ({"": metrics.map_init(info.num_classes), "ema_": metrics.map_init(info.num_classes)}
                if info.multi_label else {})
  totals: dict[str, float] = {}
  for batch in data.create_eval_iterator(config, info):
    sums, map_states = eval_step(state, to_global(batch, sharding), map_states)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  results = {}
  for prefix in ("", "ema_"):
    count = totals[prefix + "count"]
    if int(count) != info.num_eval_examples:
      logging.warning("Evaluated %d examples but the split has %d.", count, info.num_eval_examples)
    results[f"eval/{prefix}loss"] = totals[prefix + "loss"] / count
    if info.multi_label:
      results[f"eval/{prefix}precision_at_1"] = totals[prefix + "precision_at_1"] / count
      results[f"eval/{prefix}map100"] = float(metrics.map_result(map_states[prefix], config.map_class_weighting))
    else:
      results[f"eval/{prefix}top1"] = totals[prefix + "top1"] / count
      results[f"eval/{prefix}top5"] = totals[prefix + "top5"] / count
  results["eval/examples"] = totals["count"]
  return results


def load_pretrained(config: ml_collections.ConfigDict, model, state: TrainState) -> TrainState:
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
        raise ValueError(f"config.init_from={path!r}: layer {name!r} has shape {got} there but "
                         f"{np.shape(value)} in {config.model_name}.")
    if skipped:
      logging.warning("init_from: kept the freshly initialised head for %s (class count differs).",
                      skipped)
    merged[collection] = traverse_util.unflatten_dict(out, sep="/")
  # Two separate device copies each: the train step donates the state, and the same buffer given
  # twice (as params and as ema_params) makes XLA refuse to run it. np.array copies the host
  # array first, since device_put may alias a numpy array's memory on the CPU instead of copying.
  put = lambda name: jax.device_put(  # noqa: E731
      jax.tree.map(np.array, merged[name]),
      jax.tree.map(lambda x: x.sharding, getattr(state, name)))
  return state.replace(params=put("params"), batch_stats=put("batch_stats"),
                       ema_params=put("params"), ema_batch_stats=put("batch_stats"))


def _num_classes_of(model) -> int:
  return int(getattr(model, "num_classes", 0) or 0)


def steps_per_epoch(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> float:
  return info.num_train_examples / config.batch_size


def total_steps(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> int:
  if config.total_steps is not None:
    return int(config.total_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch(config, info)))


class WriteError(OSError):
  """Writing into the workdir failed (disk full, quota, permissions, storage errors)."""


# What a caller (main.py) reports as one line and exits on, instead of a traceback.
RUN_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError, WriteError)

_WRITE_FAILURES = ("No space left", "Disk quota", "Read-only file system", "Permission denied",
                   "Input/output error", "File too large", "ENOSPC", "EDQUOT")


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
      cause = line if len(line) <= 400 else f"{line[:250]} ... {line[at:at + 120]}"
    checkpoints = checkpointing.checkpoint_dir(workdir)
    try:
      steps = checkpointing.finished_steps(checkpoints)
    except Exception:  # pylint: disable=broad-except  (the storage itself may be failing)
      steps = []
    kept = (f"The last complete checkpoint, step {steps[-1]} in {checkpoints}, is intact"
            if steps else "No checkpoint had been completed yet")
    return WriteError(f"Writing to {workdir} failed: {cause}. {kept}; free space (or fix the "
                      "storage) and rerun the same command to resume.")
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
          f"Process 0 could not lock --workdir={workdir}; its log says why.")
  if isinstance(error, OSError):
    raise _as_write_error(error, workdir) or error
  if error is not None:
    raise error
  return lock


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says, resuming from `workdir` if it holds a checkpoint.

  `workdir` may be a local folder or a cloud URL (gs://bucket/run). A workdir that holds another
  config's run, or that a live trainer holds, is refused before anything is written.
  Returns the last metrics written, plus 'step' and 'preempted'.
  """
  # --- Everything that can be wrong is checked here, before any compile or write.
  mesh = make_mesh(config)
  validate_config(config, mesh.shape["data"], jax.process_count())
  info = data.dataset_info(config)
  loss_kind = config.loss if config.loss != "auto" else ("sigmoid" if info.multi_label else "softmax")
  model = create_model(config, info.num_classes)
  per_epoch = steps_per_epoch(config, info)
  num_steps = total_steps(config, info)
  tx, schedule = optim.create_optimizer(config, per_epoch, num_steps)
  best_metric = resolve_best_metric(config, info.multi_label)
  if config.map_class_weighting not in ("none", "frequency"):
    raise ValueError(f"config.map_class_weighting={config.map_class_weighting!r}: valid are "
                     "'none' and 'frequency' (classes weighted by their positives in the eval set).")
  workdir = paths.resolve(workdir)
  resumed = workdir_lib.check_identity(workdir, config)  # reads only

  try:
    paths.makedirs(workdir)
  except OSError as e:
    raise _as_write_error(e, workdir) or e
  lock = _lock_workdir(workdir)
  preemption = preemption_lib.PreemptionWatcher()  # SIGTERM from here on saves and stops
  manager = writer = None
  try:
    if jax.process_index() == 0:
      workdir_lib.record_config(workdir, config, resumed)

    # --- State: built sharded; then restore-first (a preempted run continues where it stopped).
    state, state_shardings = create_train_state(model, tx, config.image_size, mesh, config.seed)
    manager = checkpointing.create_manager(workdir, keep=config.checkpoint_keep,
                                           best_metric=best_metric)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpointing.restore_latest(manager, abstract_state)
    if restored is not None:
      state, start_step = restored
    else:
      start_step = 0
      if config.init_from:
        state = load_pretrained(config, model, state)
    _write_run_info(workdir, config, info, model, state, per_epoch, num_steps, loss_kind,
                    best_metric)

    data_sharding = NamedSharding(mesh, P("data"))
    loss_fn = make_loss_fn(loss_kind, info.num_classes, config.label_smoothing)
    train_step = jit_train_step(
        make_train_step(config, model, tx, schedule, loss_fn, info.multi_label), state_shardings,
        mesh)
    eval_step = jax.jit(make_eval_step(model, info.multi_label))

    writer = metric_writer.MetricWriter(workdir, num_steps)
    train_iter: Iterator = data.create_train_iterator(config, info, start_step=start_step,
                                                      sharding=data_sharding)
    last: dict[str, Any] = {}
    pending: list[dict] = []
    step = start_step
    saved_step = restored[1] if restored else None
    preempted = False
    timer = time.time()
    while step < num_steps:
      state, step_metrics = train_step(state, to_global(next(train_iter), data_sharding))
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
        eval_metrics = evaluate(eval_step, state, config, info, data_sharding)
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
        logging.warning("Stopped at step %d for preemption; rerun the same command to resume "
                        "(exit status %d).", step, preemption_lib.PREEMPTED_EXIT_STATUS)
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
      (writer.close,) if writer else ()):
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("While stopping: %s: %s", type(e).__name__,
                      (str(e).splitlines() or [""])[0][:300])


def _check_finite(state: TrainState, step: int, saved_step: int | None) -> None:
  bad = int(jax.device_get(state.nonfinite_steps))
  if bad:
    kept = (f"the last good checkpoint (step {saved_step}) is intact" if saved_step is not None
            else "no checkpoint had been written yet, so there is nothing to resume from")
    raise NonFiniteLossError(
        f"The training loss or gradient was NaN or Inf in {bad} step(s) up to step {step}. The "
        f"run stopped without saving; {kept}. Lower lr.base, enable optimizer.grad_clip_norm, "
        "or use dtype=float32.")


def _write_run_info(workdir: paths.PathLike, config, info, model, state: TrainState,
                    per_epoch: float, num_steps: int, loss_kind: str,
                    best_metric: str | None = None) -> None:
  """Writes run.json: the values derived at run time, for reports and for people."""
  if jax.process_index() != 0:
    return
  best_metric = best_metric or resolve_best_metric(config, info.multi_label)
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
      "jax_version": jax.__version__,
      "flax_version": flax.__version__,
      "optax_version": optax.__version__,
  }
  paths.write_json(paths.resolve(workdir) / "run.json", run)
