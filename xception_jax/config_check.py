"""`validate(config, ...)`: every check of the training, optimizer and input settings, in one place.

A run calls it once, before it reads data, compiles or writes anything
(`train.train_and_evaluate`, and the tools that build a training step from a config), so a bad
setting fails in seconds with a ValueError naming the config key, instead of after a compile or
at the first evaluation. The code that uses the settings (the optimizer factory, the schedule,
the train and eval steps, the input pipelines) trusts them and does not check them again.
Nothing is cached: each call checks the config it is given.

What is not here: model settings (`models.create` checks them when it builds the module), and
values derived from the dataset (steps per epoch, the best metric), checked where they are
computed.
"""

from __future__ import annotations

import ml_collections

from xception_jax import data
from xception_jax import keras_weights
from xception_jax import optim
from xception_jax.models import layers

# The models also run in float16, but training in it would need loss scaling, which the step
# does not do.
TRAIN_DTYPES = tuple(name for name in layers.DTYPES if name != "float16")
LOSSES = ("auto", "softmax", "sigmoid")
MAP_CLASS_WEIGHTINGS = ("none", "frequency")
BAD_FILES_MODES = ("skip", "error")


def validate(config: ml_collections.ConfigDict, num_data_devices: int, process_count: int) -> None:
  """Raises ValueError naming the config key at fault; returns None when every setting is usable.

  `num_data_devices` (the mesh's data axis) and `process_count` are what the batch sizes must
  divide evenly over.
  """
  if keras_weights.is_keras_spec(config.init_from):  # before any download or compile
    keras_weights.check_model(config.init_from, config.model_name)
  _check_run(config, num_data_devices, process_count)
  _check_optimizer(config)
  _check_input(config)


def _fail(key: str, message: str):
  raise ValueError(f"config.{key}: {message}")


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _check_run(
  config: ml_collections.ConfigDict, num_data_devices: int, process_count: int
) -> None:
  """Batch sizes, length, loss, dtype, the loop's intervals, checkpoints, EMA and MAP."""
  if config.dtype not in TRAIN_DTYPES:
    _fail("dtype", f"{config.dtype!r} is not one of {TRAIN_DTYPES}.")
  if config.loss not in LOSSES:
    _fail("loss", f"{config.loss!r} is not one of {LOSSES}.")
  if config.grad_accum_steps < 1:
    _fail("grad_accum_steps", f"must be >= 1, got {config.grad_accum_steps}.")
  micro_batch, rest = divmod(config.batch_size, config.grad_accum_steps)
  if config.batch_size <= 0 or rest:
    _fail(
      "batch_size",
      f"{config.batch_size} must be a positive multiple of "
      f"grad_accum_steps={config.grad_accum_steps}.",
    )
  if micro_batch % num_data_devices:
    _fail(
      "batch_size",
      f"{config.batch_size} (micro-batch {micro_batch} with grad_accum_steps="
      f"{config.grad_accum_steps}) must divide evenly over the {num_data_devices} devices of "
      "the mesh's data axis; valid: multiples of "
      f"{num_data_devices * config.grad_accum_steps}.",
    )
  if config.batch_size % process_count:
    _fail("batch_size", f"{config.batch_size} must divide evenly over {process_count} processes.")
  eval_batch = data.eval_batch_size(config)
  if eval_batch < 1:
    _fail("eval_batch_size", f"must be >= 1, or None or 0 for batch_size; got {eval_batch}.")
  if eval_batch % num_data_devices or eval_batch % process_count:
    _fail(
      "eval_batch_size",
      f"{eval_batch} must be a multiple of the {num_data_devices} data "
      f"devices and of the {process_count} processes.",
    )
  if config.total_steps is not None and config.total_steps <= 0:
    _fail("total_steps", f"must be positive when set, got {config.total_steps}.")
  if config.total_steps is None and config.num_epochs <= 0:
    _fail("num_epochs", f"must be positive (or set total_steps), got {config.num_epochs}.")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    if config[key] <= 0:
      _fail(key, f"must be a positive number of steps, got {config[key]}.")
  _check(
    0.0 <= config.ema.decay < 1.0,
    f"config.ema.decay={config.ema.decay!r} must be in [0, 1) (0 = no EMA)",
  )
  if config.checkpoint_keep < 1:
    _fail(
      "checkpoint_keep",
      f"must be >= 1 (the latest steps kept beside the best), got {config.checkpoint_keep}.",
    )
  if config.map_class_weighting not in MAP_CLASS_WEIGHTINGS:
    raise ValueError(
      f"config.map_class_weighting={config.map_class_weighting!r}: valid are 'none' and "
      "'frequency' (classes weighted by their positives in the eval set)."
    )


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  """optimizer.*, lr.*, weight_decay and weight_decay_on: what `optim` reads."""
  opt = config.optimizer
  _check(
    opt.name in optim.OPTIMIZERS,
    f"config.optimizer.name={opt.name!r} is not valid; valid values: {list(optim.OPTIMIZERS)}",
  )
  _check(0.0 <= opt.momentum < 1.0, f"config.optimizer.momentum={opt.momentum!r} must be in [0, 1)")
  if opt.name.startswith("rmsprop"):
    _check(
      0.0 <= opt.rms_decay < 1.0, f"config.optimizer.rms_decay={opt.rms_decay!r} must be in [0, 1)"
    )
    _check(opt.eps > 0.0, f"config.optimizer.eps={opt.eps!r} must be > 0 for {opt.name}")
  if opt.nesterov:
    _check(
      opt.name == "sgd",
      f"config.optimizer.nesterov=True is only supported with optimizer.name='sgd', "
      f"not {opt.name!r}",
    )
    _check(opt.momentum > 0.0, "config.optimizer.nesterov=True needs config.optimizer.momentum > 0")
  _check(
    opt.grad_clip_norm >= 0.0,
    f"config.optimizer.grad_clip_norm={opt.grad_clip_norm!r} must be >= 0 (0 = off)",
  )

  lr = config.lr
  _check(
    lr.schedule in optim.SCHEDULES,
    f"config.lr.schedule={lr.schedule!r} is not valid; valid values: {list(optim.SCHEDULES)}",
  )
  _check(lr.base > 0.0, f"config.lr.base={lr.base!r} must be > 0")
  _check(
    lr.reference_batch_size >= 0,
    f"config.lr.reference_batch_size={lr.reference_batch_size!r} must be >= 0 (0 = no scaling)",
  )
  _check(lr.warmup_epochs >= 0.0, f"config.lr.warmup_epochs={lr.warmup_epochs!r} must be >= 0")
  _check(
    lr.get("warmup_steps", 0) >= 0,
    f"config.lr.warmup_steps={lr.get('warmup_steps')!r} must be >= 0 (0 = use warmup_epochs)",
  )
  if lr.schedule == "exponential":
    _check(lr.decay_rate > 0.0, f"config.lr.decay_rate={lr.decay_rate!r} must be > 0")
    _check(
      lr.decay_every_samples >= 0,
      f"config.lr.decay_every_samples={lr.decay_every_samples!r} must be >= 0 "
      "(0 = decay every config.lr.decay_every_epochs)",
    )
    if lr.decay_every_samples == 0:
      _check(
        lr.decay_every_epochs > 0.0,
        f"config.lr.decay_every_epochs={lr.decay_every_epochs!r} must be > 0 when "
        "config.lr.decay_every_samples is 0",
      )

  _check(config.weight_decay >= 0.0, f"config.weight_decay={config.weight_decay!r} must be >= 0")
  _check(
    config.weight_decay_on in optim.WEIGHT_DECAY_ON,
    f"config.weight_decay_on={config.weight_decay_on!r} is not valid; "
    f"valid values: {list(optim.WEIGHT_DECAY_ON)}",
  )


def _check_input(config: ml_collections.ConfigDict) -> None:
  """dataset, image_size, num_classes and input.*: what the input pipelines read."""
  if not isinstance(config.dataset, str) or not config.dataset:
    raise ValueError(
      "config.dataset must be a tfds name, 'imagefolder:ROOT', one of "
      f"{list(data.EMBEDDED_DATASETS)} or '{data.SYNTHETIC}'; got {config.dataset!r}."
    )
  prefix = data.IMAGEFOLDER_PREFIX
  if config.dataset.startswith(prefix) and not config.dataset[len(prefix) :]:
    raise ValueError("config.dataset='imagefolder:' needs a folder: 'imagefolder:/path/to/root'.")
  if int(config.image_size) < 1:
    raise ValueError(f"config.image_size={config.image_size} must be a positive number of pixels.")
  if config.get("num_classes") is not None and int(config.num_classes) < 1:
    raise ValueError(f"config.num_classes={config.num_classes} must be >= 1 or None.")
  inp = config.input
  if inp.bad_files not in BAD_FILES_MODES:
    raise ValueError(f"config.input.bad_files={inp.bad_files!r}; valid: {list(BAD_FILES_MODES)}.")
  for key, low, high in (("area_range", 0.0, 1.0), ("aspect_ratio_range", 0.0, float("inf"))):
    value = tuple(inp[key])
    if len(value) != 2 or not low < value[0] <= value[1] <= high:
      raise ValueError(
        f"config.input.{key}={value} must be (min, max) with {low} < min <= max <= {high}."
      )
  if not 0.0 <= float(inp.min_object_covered) <= 1.0:
    raise ValueError(f"config.input.min_object_covered={inp.min_object_covered} must be in [0, 1].")
  if not 0.0 < float(inp.eval_crop_fraction) <= 1.0:
    raise ValueError(f"config.input.eval_crop_fraction={inp.eval_crop_fraction} must be in (0, 1].")
  if int(inp.shuffle_buffer) < 1:
    raise ValueError(f"config.input.shuffle_buffer={inp.shuffle_buffer} must be >= 1.")
  if int(inp.num_parallel_calls) < 1 and int(inp.num_parallel_calls) != -1:
    raise ValueError(
      f"config.input.num_parallel_calls={inp.num_parallel_calls} must be >= 1 or -1 (AUTOTUNE)."
    )
