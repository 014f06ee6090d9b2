"""Defaults shared by every config, and the `runlocal` shrink.

Each config file in this folder is a Python file with `get_config(arg: str | None)` returning a
locked `ml_collections.ConfigDict`; `--config=configs/imagenet.py:runlocal` passes "runlocal" as
`arg`, and `--config.key=value` overrides any field. Only settings live here: values derived from
them (steps per epoch, decay steps, scaled learning rate) are computed at run time by the code
that uses them, so an override of `batch_size` keeps everything consistent.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """Every field the code reads, with neutral defaults; recipes override what they need."""
  c = ml_collections.ConfigDict()

  # --- Model: `xception_jax.models.create(config.model_name, **config.model, dtype=config.dtype)`.
  c.model_name = "xception"
  c.model = ml_collections.ConfigDict()  # model keyword arguments (segments, dropout_rate, ...)
  c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters always float32)

  # --- Data.
  c.dataset = "embedded_shapes"  # tfds name | imagefolder:ROOT | embedded_shapes[_multilabel] | synthetic
  c.data_dir = ""  # where tfds data lives; "" = tfds default (~/tensorflow_datasets)
  c.train_split = ""  # "" = the dataset's usual train split
  c.eval_split = ""  # "" = the dataset's usual validation/test split
  c.num_classes = config_dict.placeholder(int)  # None = from the dataset
  c.image_size = 299
  c.input = ml_collections.ConfigDict(dict(
      area_range=(0.05, 1.0),
      aspect_ratio_range=(0.75, 1.33),
      min_object_covered=0.1,
      flip=True,
      color_distortion=False,
      eval_crop_fraction=0.875,
      shuffle_buffer=10_000,
      bad_files="skip",  # imagefolder: skip (warn, name each) | error (refuse before training)
      cache=False,
      num_parallel_calls=-1,  # -1 = tf.data.AUTOTUNE
  ))

  # --- Batch and length. batch_size is GLOBAL: per-process batch = batch_size / processes.
  c.batch_size = 32
  c.eval_batch_size = config_dict.placeholder(int)  # None = batch_size
  c.num_epochs = 100.0
  c.total_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  c.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size must divide evenly)

  # --- Optimizer and schedule (see xception_jax/optim.py).
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd",  # sgd | rmsprop_tf (TF1 semantics) | rmsprop_keras
      momentum=0.9,
      nesterov=False,
      rms_decay=0.9,
      eps=1.0,
      grad_clip_norm=0.0,  # 0 = off
  ))
  c.lr = ml_collections.ConfigDict(dict(
      base=0.045,
      reference_batch_size=0,  # 0 = use `base` as is; N > 0 = base * batch_size / N
      schedule="exponential",  # exponential | constant | cosine
      decay_rate=0.94,
      decay_every_epochs=2.0,
      decay_every_samples=0,  # > 0 overrides decay_every_epochs (the JFT recipe decays by samples)
      staircase=True,
      warmup_epochs=0.0,
      warmup_steps=0,  # > 0 overrides warmup_epochs (short fine-tuning runs count in steps)
  ))
  c.weight_decay = 0.0  # L2 as 0.5 * wd * ||w||^2 (TF-Slim), i.e. grad += wd * w
  c.weight_decay_on = "kernels"  # kernels (conv and dense kernels) | all
  c.label_smoothing = 0.0
  c.loss = "auto"  # auto (from the dataset) | softmax | sigmoid
  c.ema = ml_collections.ConfigDict(dict(
      decay=0.9999,  # 0 = no EMA
      num_updates_warmup=True,  # TF ExponentialMovingAverage: min(decay, (1 + t) / (10 + t))
  ))

  # --- Evaluation metrics.
  c.map_class_weighting = "none"  # multi-label MAP@100: none | frequency (FastEval14k-like)
  c.best_metric = ""  # "" = eval/ema_top1 (single-label) or eval/ema_map100 (multi-label)

  # --- Run control.
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  c.checkpoint_keep = 3
  # A workdir or checkpoint step folder, a Keras weight file (.h5, .weights.h5, .keras), or
  # keras:xception[_notop] / keras:inception_v3[_notop] (ImageNet weights, fetched and cached).
  c.init_from = ""
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # -1 = all devices on the data axis
  return c


def parse_arg(arg: str | None, **defaults):
  """Parses a config arg string "runlocal,variant=x,segments=4" into a ConfigDict of options.

  Bare words become True; values are converted to the type of their default.
  """
  options = ml_collections.ConfigDict(dict(runlocal=False, **defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in options:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid: {sorted(options)}")
    if not sep:
      options[key] = True
      continue
    default = options[key]
    if isinstance(default, bool):
      options[key] = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
      options[key] = int(value)
    elif isinstance(default, float):
      options[key] = float(value)
    else:
      options[key] = value
  return options


def apply_runlocal(c: ml_collections.ConfigDict, *, multi_label: bool = False) -> None:
  """Shrinks a recipe to a CPU-sized run on the embedded data (a few minutes on 2 cores)."""
  c.dataset = "embedded_shapes_multilabel" if multi_label else "embedded_shapes"
  c.num_classes = None
  c.image_size = 80  # >= 71 (Xception) and >= 75 (Inception V3)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.total_steps = 20
  c.log_every_steps = 5
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 10
  c.input.shuffle_buffer = 1000
  c.lr.warmup_epochs = 0.0
  if c.model_name.startswith("inception_v3"):
    c.model_name = "inception_v3_tiny"
  else:
    c.model_name = "xception_tiny"
  c.dtype = "float32"
