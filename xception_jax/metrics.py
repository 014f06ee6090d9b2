"""Losses and evaluation metrics, all jittable and exact over a sharded, padded eval set.

Why sums and streaming state instead of means: the eval set is split into global batches whose
last one is padded (mask = 1 for real examples, 0 for padding). Per-batch means would weight the
last batch wrongly and padding would leak in; so every function here returns SUMS over the real
examples (the trainer divides by the summed `count` at the end), and MAP@100, which is not a sum
over examples, keeps a small exact streaming state instead. Inside `jax.jit` on globally sharded
arrays the sums reduce over the global batch.

Padded rows may hold anything (even NaN logits): they are removed with `jnp.where`, never by
multiplying with the mask (NaN * 0 = NaN).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAP_AT = 100  # the paper's MAP@100 (FastEval14k)


def _real(mask: jax.typing.ArrayLike, batch: int) -> jax.Array:
  """mask (bool or 0/1 numbers, shape [batch]) as a bool vector."""
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(f"mask has shape {mask.shape}; expected ({batch},), one entry per example")
  return mask.astype(bool)


def _masked_sum(values: jax.Array, real: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(real, values, 0.0).astype(jnp.float32))


# ----------------------------------------------------------------------------- losses


def softmax_cross_entropy(
  logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example softmax cross-entropy [batch], in float32 whatever the logits' dtype.

  Targets are (1 - label_smoothing) * one_hot + label_smoothing / num_classes, the convention of
  tf.compat.v1.losses.softmax_cross_entropy and the tensorflow/tpu Inception recipe (0.1).
  Labels outside [0, num_classes) give an all-zero target (zero loss): the caller validates labels.
  """
  if logits.shape[-1] != num_classes:
    raise ValueError(f"logits have {logits.shape[-1]} classes but num_classes={num_classes}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing={label_smoothing!r} must be in [0, 1)")
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing > 0:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets * log_probs, axis=-1)


def sigmoid_cross_entropy(
  logits: jax.Array, multi_hot: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Per-example sigmoid cross-entropy [batch], SUMMED over classes, in float32.

  Sum, not mean, over classes: with ~17,000 classes and a few positives per image a mean would
  shrink gradients by the class count, and with RMSprop's epsilon = 1.0 (inside the square root)
  the step size depends on the gradient's scale, so the choice matters. The sum keeps a
  per-image loss of the same order as softmax cross-entropy (big_vision's sigmoid_xent does the
  same). Smoothed targets: multi_hot * (1 - s) + 0.5 * s (tf.compat.v1.losses.sigmoid_cross_entropy).
  """
  if logits.shape != multi_hot.shape:
    raise ValueError(f"logits shape {logits.shape} != multi_hot labels shape {multi_hot.shape}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing={label_smoothing!r} must be in [0, 1)")
  targets = multi_hot.astype(jnp.float32)
  if label_smoothing > 0:
    targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
  logits = logits.astype(jnp.float32)
  # log(1 + exp(-|x|)) form: stable for large |x|.
  per_class = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.sum(per_class, axis=-1)


# ----------------------------------------------------------------------------- single-label


def classification_counts(
  logits: jax.Array, labels: jax.Array, mask: jax.typing.ArrayLike
) -> dict[str, jax.Array]:
  """Sums over the real examples of a batch: count, top1, top5, loss (float32 scalars).

  top1: argmax == label (ties go to the lowest class index, so all-equal logits are not "correct"
  for every class). top5: label among lax.top_k(logits, min(5, classes)) (same tie rule). loss:
  unsmoothed softmax cross-entropy. Divide each sum by the summed `count` to get the eval means.
  """
  batch, num_classes = logits.shape
  real = _real(mask, batch)
  labels = jnp.asarray(labels)
  logits_f = logits.astype(jnp.float32)
  top1 = jnp.argmax(logits_f, axis=-1) == labels
  _, top_idx = jax.lax.top_k(logits_f, min(5, num_classes))
  top5 = jnp.any(top_idx == labels[:, None], axis=-1)
  loss = softmax_cross_entropy(logits_f, labels, num_classes)
  return dict(
    count=jnp.sum(real.astype(jnp.float32)),
    top1=_masked_sum(top1, real),
    top5=_masked_sum(top5, real),
    loss=_masked_sum(loss, real),
  )


# ----------------------------------------------------------------------------- multi-label


def multilabel_counts(
  logits: jax.Array, multi_hot: jax.Array, mask: jax.typing.ArrayLike
) -> dict[str, jax.Array]:
  """Sums over the real examples: count, precision_at_1, loss (float32 scalars).

  precision_at_1: 1 when the image's top-scored class (argmax, lowest index on ties) is one of its
  positive labels. loss: sigmoid cross-entropy summed over classes, unsmoothed.
  """
  batch = logits.shape[0]
  real = _real(mask, batch)
  logits_f = logits.astype(jnp.float32)
  top = jnp.argmax(logits_f, axis=-1)
  hit = jnp.take_along_axis(multi_hot, top[:, None], axis=-1)[:, 0] > 0
  loss = sigmoid_cross_entropy(logits_f, multi_hot)
  return dict(
    count=jnp.sum(real.astype(jnp.float32)),
    precision_at_1=_masked_sum(hit, real),
    loss=_masked_sum(loss, real),
  )


class MapState(NamedTuple):
  """Streaming state of MAP@K over an eval set (a pytree: jit-, shard- and checkpoint-friendly).

  top_scores: [C, K] float32, per class the K highest scores seen so far, descending; empty slots
    hold -inf. Among equal scores the earlier-seen image comes first.
  top_positive: [C, K] bool, whether the image in that slot is a positive of the class (False
    for empty slots).
  num_positives: [C] int32, positives of each class among ALL real images seen (not only the top K).
  """

  top_scores: jax.Array
  top_positive: jax.Array
  num_positives: jax.Array


def map_init(num_classes: int, k: int = MAP_AT) -> MapState:
  """An empty MAP@k state for `num_classes` classes."""
  if num_classes < 1 or k < 1:
    raise ValueError(f"map_init needs num_classes >= 1 and k >= 1, got {num_classes}, {k}")
  return MapState(
    top_scores=jnp.full((num_classes, k), -jnp.inf, jnp.float32),
    top_positive=jnp.zeros((num_classes, k), bool),
    num_positives=jnp.zeros((num_classes,), jnp.int32),
  )


def map_update(
  state: MapState, scores: jax.Array, multi_hot: jax.Array, mask: jax.typing.ArrayLike
) -> MapState:
  """Merges a batch into the state; jittable.

  scores: [B, C], any score monotonic in the model's confidence (pass logits: sigmoid outputs
  saturate to equal values and create ties). Real scores must be finite (> -inf): -inf marks
  empty slots and padding. multi_hot: [B, C] labels (> 0 = positive). mask: [B], 1 = real row.
  Padded rows never enter: their scores become -inf and their positives False, so they can only
  fill slots that would otherwise stay empty, where they count as nothing.
  The merge is lax.top_k over [C, K + B] = (state, batch): top_k puts the lower index first on
  ties, so among equal scores earlier images rank first, a deterministic and order-exact rule.
  """
  num_classes, k = state.top_scores.shape
  if scores.ndim != 2 or scores.shape[1] != num_classes:
    raise ValueError(f"scores have shape {scores.shape}; expected [batch, {num_classes}]")
  if multi_hot.shape != scores.shape:
    raise ValueError(f"multi_hot shape {multi_hot.shape} != scores shape {scores.shape}")
  real = _real(mask, scores.shape[0])
  positive = jnp.logical_and(multi_hot > 0, real[:, None])
  batch_scores = jnp.where(real[:, None], scores.astype(jnp.float32), -jnp.inf)
  all_scores = jnp.concatenate([state.top_scores, batch_scores.T], axis=1)
  all_positive = jnp.concatenate([state.top_positive, positive.T], axis=1)
  top_scores, idx = jax.lax.top_k(all_scores, k)
  top_positive = jnp.take_along_axis(all_positive, idx, axis=1)
  return MapState(
    top_scores=top_scores,
    top_positive=top_positive,
    num_positives=state.num_positives + jnp.sum(positive, axis=0, dtype=jnp.int32),
  )


def map_per_class(state: MapState) -> jax.Array:
  """AP@K of each class [C] (float32); 0 for classes without positives.

  AP@K(c) = sum_{i<=K} rel_c(i) * precision_c@i / min(K, positives_c), where images are ranked by
  their score for class c, rel_c(i) = 1 if the i-th ranked image is a positive of c, and
  precision_c@i = (positives among the first i) / i.
  """
  k = state.top_scores.shape[1]
  rel = state.top_positive.astype(jnp.float32)
  ranks = jnp.arange(1, k + 1, dtype=jnp.float32)
  precision = jnp.cumsum(rel, axis=1) / ranks
  denom = jnp.minimum(state.num_positives, k).astype(jnp.float32)
  return jnp.sum(rel * precision, axis=1) / jnp.maximum(denom, 1.0)


def map_result(state: MapState, class_weights: Any = None) -> jax.Array:
  """MAP@K: the (weighted) mean of per-class AP@K over classes with at least one positive.

  class_weights:
  - None or 'none': every class with a positive weighs the same.
  - 'frequency': weight proportional to the class's positives in the eval set. The paper's
    FastEval14k weights each class "by how common (and therefore important) the class is among
    social media images", an external estimate we do not have; the eval-set frequency stands in
    for it.
  - an array [C] of non-negative weights (classes without positives get weight 0 regardless).
  Returns a float32 scalar; NaN when no class has a positive (MAP is undefined then).
  """
  num_classes = state.num_positives.shape[0]
  has_positive = state.num_positives > 0
  if class_weights is None or (isinstance(class_weights, str) and class_weights == "none"):
    weights = jnp.ones((num_classes,), jnp.float32)
  elif isinstance(class_weights, str):
    if class_weights != "frequency":
      raise ValueError(
        f"config.map_class_weighting={class_weights!r} is not valid; "
        "valid values: ['none', 'frequency']"
      )
    weights = state.num_positives.astype(jnp.float32)
  else:
    weights = jnp.asarray(class_weights, jnp.float32)
    if weights.shape != (num_classes,):
      raise ValueError(f"class_weights has shape {weights.shape}; expected ({num_classes},)")
  weights = jnp.where(has_positive, weights, 0.0)
  return jnp.sum(weights * map_per_class(state)) / jnp.sum(weights)
