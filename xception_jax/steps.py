"""The train state and the steps that update and evaluate it, top to bottom.

Read this file to see what one training step does: the loss (`make_loss_fn`), the gradients with
optional accumulation over micro-batches, the optimizer update, the EMA of the weights and the
batch-norm statistics, the NaN/Inf count (`make_train_step`); how the step is compiled, with the
batch sharded and the state donated (`jit_train_step`); and what one eval step sums
(`make_eval_step`). `train.train_and_evaluate` runs these in its loop and `tools/benchmark` times
exactly the same functions, so a change here changes both.

Parallelism is data-parallel `jax.jit` over a device Mesh with a 'data' axis: the batch is sharded
over 'data', the state is replicated, and XLA inserts the gradient all-reduce. Because the jitted
step sees the global batch, batch-norm statistics are computed over the global batch
(synchronised BN), as in the paper's synchronous data-parallel training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from xception_jax import data
from xception_jax import metrics
from xception_jax import optim

PyTree = Any


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


def create_train_state(
  model, tx: optax.GradientTransformation, image_size: int, mesh: jax.sharding.Mesh, seed: int
) -> tuple[TrainState, PyTree]:
  """Initialises the state directly into its sharded placement (no host copy of the weights).

  Returns the state and its sharding tree (used by the step's jit and by checkpoint restore).
  """

  def init(rng):
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init(rng, dummy, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=params,
      ema_batch_stats=batch_stats,
      nonfinite_steps=jnp.zeros((), jnp.int32),
    )

  rng = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(init, rng)
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract)
  lowered = jax.jit(init, out_shardings=shardings).lower(rng)
  # Init runs once; XLA's CPU backend spends ~4x longer optimising its many RNG draws than at
  # level 0, which is most of a small model's start-up time on a laptop.
  options = {"xla_backend_optimization_level": 0} if jax.devices()[0].platform == "cpu" else None
  state = lowered.compile(compiler_options=options)(rng)
  return state, shardings


def make_loss_fn(loss_kind: str, num_classes: int, label_smoothing: float) -> Callable:
  """Per-example loss: softmax cross-entropy (one label) or sigmoid cross-entropy (multi-hot)."""
  if loss_kind == "softmax":
    return lambda logits, labels: metrics.softmax_cross_entropy(
      logits, labels, num_classes, label_smoothing
    )
  return lambda logits, labels: metrics.sigmoid_cross_entropy(logits, labels, label_smoothing)


def make_train_step(
  config: ml_collections.ConfigDict,
  model,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_fn: Callable,
  multi_label: bool,
) -> Callable:
  """Returns train_step(state, batch) -> (state, metrics); jit it with shardings and donation."""
  base_rng = jax.random.PRNGKey(config.seed)
  accum = config.grad_accum_steps

  def forward(params, batch_stats, images, labels, rng):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": batch_stats},
      data.model_input(images),
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": rng},
    )
    loss = jnp.mean(loss_fn(logits, labels))
    return loss, (logits, mutated["batch_stats"])

  grad_fn = jax.value_and_grad(forward, has_aux=True)

  def train_batch_top1(logits, labels):
    if multi_label:
      top = jnp.argmax(logits, axis=-1)
      return jnp.mean(jnp.take_along_axis(labels, top[:, None], axis=-1))
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

  def train_step(state: TrainState, batch: data.Batch):
    rng = jax.random.fold_in(base_rng, state.step)  # per-step randomness: resume-exact
    images, labels = batch["image"], batch["label"]
    if accum == 1:
      (loss, (logits, batch_stats)), grads = grad_fn(
        state.params, state.batch_stats, images, labels, rng
      )
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
          state.params, batch_stats, micro_images, micro_labels, jax.random.fold_in(rng, index)
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (
          grads_sum,
          batch_stats,
          loss_sum + loss,
          top1_sum + train_batch_top1(logits, micro_labels),
        ), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats, loss, top1), _ = jax.lax.scan(
        micro_step,
        (zeros, state.batch_stats, 0.0, 0.0),
        (split(images), split(labels), jnp.arange(accum)),
      )
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, top1 = loss / accum, top1 / accum

    grad_norm = optax.global_norm(grads)
    # The loss alone can stay finite while gradients are NaN (XLA's max ignores NaN operands).
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = optim.ema_decay(state.step + 1, config)  # num_updates including this one (TF-Slim)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      ema_params=optim.ema_update(state.ema_params, params, decay),
      ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, decay),
      nonfinite_steps=state.nonfinite_steps + nonfinite.astype(jnp.int32),
    )
    step_metrics = {
      "train/loss": loss,
      "train/lr": schedule(state.step),
      "train/grad_norm": grad_norm,
      ("train/precision_at_1" if multi_label else "train/top1"): top1,
    }
    return new_state, step_metrics

  return train_step


def jit_train_step(
  train_step: Callable, state_shardings: PyTree, mesh: jax.sharding.Mesh
) -> Callable:
  """Compiles the step as training runs it: batch sharded over 'data', state donated in place."""
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, NamedSharding(mesh, P("data"))),
    out_shardings=(state_shardings, NamedSharding(mesh, P())),
    donate_argnums=(0,),
  )


def make_eval_step(model, multi_label: bool) -> Callable:
  """Returns eval_step(state, batch, map_states) -> (sums, map_states) for raw and EMA weights.

  Sums (not means) over the real examples of the batch (mask = 1), so the totals over all
  batches are exact whatever the padding of the last one.
  """

  def eval_step(state: TrainState, batch: data.Batch, map_states: dict):
    sums = {}
    for prefix, params, batch_stats in (
      ("", state.params, state.batch_stats),
      ("ema_", state.ema_params, state.ema_batch_stats),
    ):
      logits = model.apply(
        {"params": params, "batch_stats": batch_stats},
        data.model_input(batch["image"]),
        train=False,
      )
      if multi_label:
        counts = metrics.multilabel_counts(logits, batch["label"], batch["mask"])
        map_states = {
          **map_states,
          prefix: metrics.map_update(map_states[prefix], logits, batch["label"], batch["mask"]),
        }
      else:
        counts = metrics.classification_counts(logits, batch["label"], batch["mask"])
      sums.update({prefix + k: v for k, v in counts.items()})
    return sums, map_states

  return eval_step
