"""The optimizer chain, learning-rate schedules and Polyak (EMA) averaging, built from the config.

Why this module exists: the paper's two recipes depend on details that differ between frameworks
and that a generic optimizer silently gets wrong:

- ImageNet (paper, TF-Slim): SGD with momentum 0.9, lr 0.045 decayed x0.94 every 2 epochs
  (staircase), L2 weight decay 1e-5 on the kernels, Polyak averaging for eval.
- JFT (paper) and the Inception recipes: RMSprop with momentum 0.9, decay 0.9 and epsilon 1.0 in
  TensorFlow 1 semantics. With epsilon = 1.0 the placement of epsilon and the initial value of the
  mean-square accumulator change the optimizer, not just its numerics.

The update rules, written out (g = gradient after weight decay and clipping, lr = schedule(t)):

- ``sgd`` (tf.compat.v1.train.MomentumOptimizer):
    accum = momentum * accum + g;  w -= lr * accum
    nesterov: w -= lr * (g + momentum * accum)   (accum already updated)
  The learning rate multiplies the accumulator when it is applied (optax.sgd does the same), so a
  staircase drop in lr takes effect at once. Keras' SGD folds lr into the velocity instead; the
  two agree only while lr is constant.
- ``rmsprop_tf`` (tf.compat.v1.train.RMSPropOptimizer, TF-Slim, tensorflow/tpu Inception):
    ms = rho * ms + (1 - rho) * g^2,  ms starts at ONES
    mom = momentum * mom + lr * g / sqrt(ms + eps)   (eps INSIDE the square root)
    w -= mom
- ``rmsprop_keras`` (Keras 3 keras/src/optimizers/rmsprop.py, also tf_keras' current RMSprop):
  the same formula, but the mean square starts at ZEROS. Checked against the Keras 3.15 source:
  Keras 3 puts epsilon inside the square root too (``lr * g / sqrt(velocity + epsilon)``). Only
  the legacy Keras 2 optimizer without momentum used ``sqrt(ms) + eps``; that variant is not
  offered here because no recipe in this project uses it.

Both RMSprop forms map onto optax.rmsprop(eps_in_sqrt=True, initial_scale=1 or 0, momentum): its
chain is scale_by_rms -> scale_by_learning_rate -> trace, i.e. the momentum accumulates the
already-scaled step lr * g / sqrt(ms + eps), exactly as TF does (tests/test_optim.py checks the
numbers by hand and, when TensorFlow is installed, against TF and Keras themselves).

Weight decay is L2 regularisation as TF-Slim writes it: 0.5 * wd * ||w||^2 added to the loss,
i.e. grad += wd * w, applied BEFORE the optimizer (so it goes through momentum and the RMS
scaling, unlike decoupled AdamW-style decay). By default only the conv and dense kernels decay:
biases, batch-norm scales and offsets do not (TF-Slim's arg_scope puts the regularizer on
weights only).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ("sgd", "rmsprop_tf", "rmsprop_keras")
SCHEDULES = ("exponential", "constant", "cosine")
WEIGHT_DECAY_ON = ("kernels", "all")


# ----------------------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config key at fault, before anything is traced or compiled.

  Covers every field this module reads: optimizer.*, lr.*, batch_size, weight_decay,
  weight_decay_on and ema.*.
  """
  opt = config.optimizer
  _check(opt.name in OPTIMIZERS,
         f"config.optimizer.name={opt.name!r} is not valid; valid values: {list(OPTIMIZERS)}")
  _check(0.0 <= opt.momentum < 1.0,
         f"config.optimizer.momentum={opt.momentum!r} must be in [0, 1)")
  if opt.name.startswith("rmsprop"):
    _check(0.0 <= opt.rms_decay < 1.0,
           f"config.optimizer.rms_decay={opt.rms_decay!r} must be in [0, 1)")
    _check(opt.eps > 0.0, f"config.optimizer.eps={opt.eps!r} must be > 0 for {opt.name}")
  if opt.nesterov:
    _check(opt.name == "sgd",
           f"config.optimizer.nesterov=True is only supported with optimizer.name='sgd', "
           f"not {opt.name!r}")
    _check(opt.momentum > 0.0, "config.optimizer.nesterov=True needs config.optimizer.momentum > 0")
  _check(opt.grad_clip_norm >= 0.0,
         f"config.optimizer.grad_clip_norm={opt.grad_clip_norm!r} must be >= 0 (0 = off)")

  lr = config.lr
  _check(lr.schedule in SCHEDULES,
         f"config.lr.schedule={lr.schedule!r} is not valid; valid values: {list(SCHEDULES)}")
  _check(lr.base > 0.0, f"config.lr.base={lr.base!r} must be > 0")
  _check(lr.reference_batch_size >= 0,
         f"config.lr.reference_batch_size={lr.reference_batch_size!r} must be >= 0 (0 = no scaling)")
  _check(config.batch_size >= 1, f"config.batch_size={config.batch_size!r} must be >= 1")
  _check(lr.warmup_epochs >= 0.0, f"config.lr.warmup_epochs={lr.warmup_epochs!r} must be >= 0")
  _check(lr.get("warmup_steps", 0) >= 0,
         f"config.lr.warmup_steps={lr.get('warmup_steps')!r} must be >= 0 (0 = use warmup_epochs)")
  if lr.schedule == "exponential":
    _check(lr.decay_rate > 0.0, f"config.lr.decay_rate={lr.decay_rate!r} must be > 0")
    _check(lr.decay_every_samples >= 0,
           f"config.lr.decay_every_samples={lr.decay_every_samples!r} must be >= 0 "
           "(0 = decay every config.lr.decay_every_epochs)")
    if lr.decay_every_samples == 0:
      _check(lr.decay_every_epochs > 0.0,
             f"config.lr.decay_every_epochs={lr.decay_every_epochs!r} must be > 0 when "
             "config.lr.decay_every_samples is 0")

  _check(config.weight_decay >= 0.0, f"config.weight_decay={config.weight_decay!r} must be >= 0")
  _check(config.weight_decay_on in WEIGHT_DECAY_ON,
         f"config.weight_decay_on={config.weight_decay_on!r} is not valid; "
         f"valid values: {list(WEIGHT_DECAY_ON)}")
  _check(0.0 <= config.ema.decay < 1.0,
         f"config.ema.decay={config.ema.decay!r} must be in [0, 1) (0 = no EMA)")


# ----------------------------------------------------------------------------- schedules


def scaled_base_learning_rate(config: ml_collections.ConfigDict) -> float:
  """lr.base, times batch_size / lr.reference_batch_size when that is > 0.

  Computed here at run time (never in a config file) so that `--config.batch_size=...` keeps the
  linear-scaling rule of e.g. the tensorflow/tpu recipe (0.165 * batch / 256).
  """
  base = float(config.lr.base)
  if config.lr.reference_batch_size > 0:
    base *= config.batch_size / config.lr.reference_batch_size
  return base


def decay_interval_steps(config: ml_collections.ConfigDict, steps_per_epoch: float) -> float:
  """Optimizer steps between two exponential decays (may be fractional).

  JFT decays by samples (3,000,000 samples = 3e6 / batch_size steps); ImageNet by epochs
  (2 epochs = 2 * 1,281,167 / batch_size steps). Not truncated to an integer: the decay happens at
  the exact sample count, as the paper states it (TF-Slim truncates with int(); at batch 32 the
  difference is under one step).
  """
  if config.lr.decay_every_samples > 0:
    return config.lr.decay_every_samples / config.batch_size
  _check(steps_per_epoch > 0,
         f"steps_per_epoch={steps_per_epoch!r} must be > 0 to decay every "
         f"config.lr.decay_every_epochs={config.lr.decay_every_epochs!r} epochs")
  return config.lr.decay_every_epochs * steps_per_epoch


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: float,
                           total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (one global batch per step).

  - ``exponential``: peak * decay_rate ** (step / decay_interval), floored when lr.staircase
    (tf.compat.v1.train.exponential_decay, computed in float32 as TF does).
  - ``constant``: peak.
  - ``cosine``: peak * 0.5 * (1 + cos(pi * p)), p going 0 -> 1 from the end of warmup to total_steps.
  - Warmup (lr.warmup_epochs > 0, or lr.warmup_steps > 0, which takes precedence): peak * step /
    warmup_steps for step < warmup_steps, then the schedule above. The exponential decay keeps
    counting from step 0 (tensorflow/tpu style), so the recipe's decay boundaries stay at the same
    epochs with or without warmup.

  peak = scaled_base_learning_rate(config). Raises ValueError for bad config values.
  """
  validate_config(config)
  lr = config.lr
  peak = scaled_base_learning_rate(config)
  warmup_steps = float(lr.get("warmup_steps", 0) or lr.warmup_epochs * steps_per_epoch)
  if lr.warmup_epochs > 0 and not lr.get("warmup_steps", 0):
    _check(steps_per_epoch > 0,
           f"steps_per_epoch={steps_per_epoch!r} must be > 0 for config.lr.warmup_epochs > 0")

  if lr.schedule == "constant":
    def after_warmup(step):
      return jnp.full(jnp.shape(step), peak, jnp.float32)
  elif lr.schedule == "exponential":
    interval = decay_interval_steps(config, steps_per_epoch)
    rate, staircase = float(lr.decay_rate), bool(lr.staircase)

    def after_warmup(step):
      exponent = jnp.asarray(step, jnp.float32) / jnp.float32(interval)
      if staircase:
        exponent = jnp.floor(exponent)
      return jnp.float32(peak) * jnp.power(jnp.float32(rate), exponent)
  elif lr.schedule == "cosine":
    _check(total_steps is not None and total_steps > warmup_steps,
           f"config.lr.schedule='cosine' needs total_steps={total_steps!r} > warmup steps "
           f"({warmup_steps}, from config.lr.warmup_epochs={lr.warmup_epochs!r} or "
           f"warmup_steps={lr.get('warmup_steps', 0)!r})")
    span = float(total_steps) - warmup_steps

    def after_warmup(step):
      progress = (jnp.asarray(step, jnp.float32) - warmup_steps) / jnp.float32(span)
      progress = jnp.clip(progress, 0.0, 1.0)
      return jnp.float32(peak) * 0.5 * (1.0 + jnp.cos(jnp.float32(math.pi) * progress))
  else:  # validate_config already rejected it; kept for exhaustiveness.
    raise ValueError(f"config.lr.schedule={lr.schedule!r}; valid values: {list(SCHEDULES)}")

  if warmup_steps <= 0:
    return after_warmup

  def schedule(step):
    step_f = jnp.asarray(step, jnp.float32)
    warm = jnp.float32(peak) * step_f / jnp.float32(warmup_steps)
    return jnp.where(step_f < warmup_steps, warm, after_warmup(step))

  return schedule


# ----------------------------------------------------------------------------- weight decay


def _leaf_name(path: tuple[Any, ...]) -> str:
  """The last key of a pytree path as a string ('kernel' for params['Conv_0']['kernel'])."""
  if not path:
    return ""
  last = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return str(last)


def is_kernel_path(path: tuple[Any, ...]) -> bool:
  """True for conv and dense kernels: leaves named 'kernel' (Flax) or '*_kernel'.

  The suffix form also covers modules that name their weights like Keras
  ('depthwise_kernel', 'pointwise_kernel'). Biases, BN scale/bias and anything else are excluded.
  """
  name = _leaf_name(path)
  return name == "kernel" or name.endswith("_kernel")


def weight_decay_mask(params: Any, on: str = "kernels") -> Any:
  """A pytree of bools like `params`: True where L2 weight decay applies.

  on='kernels': conv and dense kernels only (the paper's and TF-Slim's default); on='all': every
  parameter. Raises ValueError when on='kernels' matches no leaf (a silent no-op weight decay
  would otherwise go unnoticed, e.g. if a model renamed its kernels).
  """
  _check(on in WEIGHT_DECAY_ON,
         f"config.weight_decay_on={on!r} is not valid; valid values: {list(WEIGHT_DECAY_ON)}")
  if on == "all":
    return jax.tree.map(lambda _: True, params)
  mask = jax.tree_util.tree_map_with_path(lambda path, _: is_kernel_path(path), params)
  _check(any(jax.tree.leaves(mask)),
         "config.weight_decay_on='kernels' but no parameter is named 'kernel' or '*_kernel'; "
         "use weight_decay_on='all' or name the conv/dense weights 'kernel'")
  return mask


# ----------------------------------------------------------------------------- optimizer


def _base_optimizer(config: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  momentum = float(opt.momentum) if opt.momentum > 0 else None
  if opt.name == "sgd":
    return optax.sgd(schedule, momentum=momentum, nesterov=bool(opt.nesterov))
  if opt.name in ("rmsprop_tf", "rmsprop_keras"):
    return optax.rmsprop(
        schedule,
        decay=float(opt.rms_decay),
        eps=float(opt.eps),
        initial_scale=1.0 if opt.name == "rmsprop_tf" else 0.0,
        eps_in_sqrt=True,
        centered=False,
        momentum=momentum,
        nesterov=False,
    )
  raise ValueError(f"config.optimizer.name={opt.name!r} is not valid; valid values: {list(OPTIMIZERS)}")


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: float,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full gradient transformation and its learning-rate schedule.

  Chain: L2 weight decay (grad += wd * w, masked by config.weight_decay_on) -> global-norm
  clipping (config.optimizer.grad_clip_norm > 0) -> SGD or RMSprop with the schedule. Clipping
  comes after the decay because in TF-Slim the regulariser is part of the loss whose gradient is
  clipped. The returned schedule is the one inside the optimizer, for logging
  (schedule(step) is the lr used by the update that produces step + 1).
  """
  validate_config(config)
  schedule = learning_rate_schedule(config, steps_per_epoch, total_steps)
  parts = []
  if config.weight_decay > 0:
    on = config.weight_decay_on
    parts.append(optax.add_decayed_weights(float(config.weight_decay),
                                           mask=lambda params: weight_decay_mask(params, on)))
  if config.optimizer.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(config.optimizer.grad_clip_norm)))
  parts.append(_base_optimizer(config, schedule))
  return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- EMA


def ema_decay(step: jax.typing.ArrayLike, config: ml_collections.ConfigDict) -> jax.Array:
  """The Polyak-averaging decay to use at `step` (float32 scalar, jittable in `step`).

  tf.train.ExponentialMovingAverage(decay, num_updates=step) uses
  min(decay, (1 + step) / (10 + step)) so early averages are not dominated by the random init
  (config.ema.num_updates_warmup); otherwise the constant config.ema.decay. TF-Slim runs the
  average after apply_gradients has incremented global_step, so passing the number of optimizer
  updates done so far (1 at the first update) reproduces it. decay 0 means no averaging: the EMA
  tree then simply follows the raw one.
  """
  _check(0.0 <= config.ema.decay < 1.0,
         f"config.ema.decay={config.ema.decay!r} must be in [0, 1) (0 = no EMA)")
  decay = jnp.float32(config.ema.decay)
  if config.ema.num_updates_warmup:
    t = jnp.asarray(step, jnp.float32)
    decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return decay


def ema_update(ema_tree: Any, new_tree: Any, decay: jax.typing.ArrayLike) -> Any:
  """shadow -= (1 - decay) * (shadow - value), leaf by leaf (TF's formula); jittable.

  Used for parameters and batch-norm statistics alike. Each leaf keeps the EMA tree's dtype, so an
  fp32 average of bf16 values stays fp32. Non-float leaves (counters) are copied from `new_tree`.
  """
  decay = jnp.asarray(decay, jnp.float32)

  def update(shadow, value):
    if not jnp.issubdtype(jnp.result_type(shadow), jnp.inexact):
      return value
    shadow_f = jnp.asarray(shadow, jnp.float32)
    out = shadow_f - (1.0 - decay) * (shadow_f - jnp.asarray(value, jnp.float32))
    return out.astype(jnp.result_type(shadow))

  return jax.tree.map(update, ema_tree, new_tree)
