"""Losses and eval metrics on hand-made examples, padding masks, and streaming MAP@100 vs brute force."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from xception_jax import metrics

# ----------------------------------------------------------------------------- losses


def test_softmax_cross_entropy_by_hand_with_smoothing():
  logits = jnp.log(jnp.array([[1.0, 3.0], [1.0, 1.0]]))  # probs [0.25, 0.75] and [0.5, 0.5]
  labels = jnp.array([1, 0])
  np.testing.assert_allclose(
    metrics.softmax_cross_entropy(logits, labels, 2, 0.0), [-math.log(0.75), math.log(2)], rtol=1e-6
  )
  # Smoothing 0.2 over 2 classes: targets [0.1, 0.9].
  np.testing.assert_allclose(
    metrics.softmax_cross_entropy(logits, labels, 2, 0.2)[0],
    -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="num_classes"):
    metrics.softmax_cross_entropy(logits, labels, 3, 0.0)
  # bf16 logits still give a float32 loss.
  assert metrics.softmax_cross_entropy(logits.astype(jnp.bfloat16), labels, 2).dtype == jnp.float32


def test_sigmoid_cross_entropy_sums_over_classes():
  def by_hand(x, t):
    s = 1 / (1 + math.exp(-x))
    return -(t * math.log(s) + (1 - t) * math.log(1 - s))

  logits = jnp.array([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
  multi_hot = jnp.array([[1, 0, 1], [0, 0, 0]])
  got = metrics.sigmoid_cross_entropy(logits, multi_hot)
  np.testing.assert_allclose(
    got, [by_hand(2, 1) + by_hand(-1, 0) + by_hand(0, 1), 3 * math.log(2)], rtol=1e-6
  )
  # Smoothing 0.1: targets 0.95 / 0.05.
  got = metrics.sigmoid_cross_entropy(logits, multi_hot, 0.1)
  want = by_hand(2, 0.95) + by_hand(-1, 0.05) + by_hand(0, 0.95)
  np.testing.assert_allclose(got[0], want, rtol=1e-6)
  # Stable for large logits: log(1 + e^100) = 100.
  np.testing.assert_allclose(
    metrics.sigmoid_cross_entropy(jnp.array([[100.0]]), jnp.array([[0]])), [100.0], rtol=1e-6
  )


# ----------------------------------------------------------------------------- counts


def test_classification_counts_with_padding():
  logits = jnp.array(
    [
      [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 1: top-1
      [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 3: rank 4, top-5 only
      [9.0, 8.0, 7.0, 6.0, 5.0, 0.0],  # label 5: rank 6, neither
      [jnp.nan] * 6,  # padding with garbage
    ]
  )
  labels = jnp.array([1, 3, 5, -1])
  mask = jnp.array([1, 1, 1, 0])
  got = jax.jit(metrics.classification_counts)(logits, labels, mask)
  p = np.exp(np.array(logits[:3], np.float64))
  p /= p.sum(-1, keepdims=True)
  want_loss = -np.log(p[[0, 1, 2], [1, 3, 5]]).sum()
  np.testing.assert_allclose(got["count"], 3)
  np.testing.assert_allclose(got["top1"], 1)
  np.testing.assert_allclose(got["top5"], 2)
  np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
  # All-equal logits are not "correct" for every label (ties go to the lowest class index).
  flat = metrics.classification_counts(jnp.zeros((2, 10)), jnp.array([0, 7]), jnp.ones(2))
  assert float(flat["top1"]) == 1.0 and float(flat["top5"]) == 1.0
  with pytest.raises(ValueError, match="mask"):
    metrics.classification_counts(logits, labels, jnp.ones(3))


def test_multilabel_counts_with_padding():
  logits = jnp.array([[3.0, 1.0, -2.0], [0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
  multi_hot = jnp.array([[1, 0, 1], [1, 1, 0], [1, 1, 1]])
  mask = jnp.array([True, True, False])
  got = jax.jit(metrics.multilabel_counts)(logits, multi_hot, mask)
  np.testing.assert_allclose(got["count"], 2)
  np.testing.assert_allclose(
    got["precision_at_1"], 1
  )  # row 0's top class 0 is positive, row 1's 2 not
  want_loss = metrics.sigmoid_cross_entropy(logits[:2], multi_hot[:2]).sum()
  np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-6)


# ----------------------------------------------------------------------------- MAP@100


def brute_force_map(scores, positive, k=100, weighting=None):
  """MAP@k over the whole [N, C] matrix: rank every image per class (score desc, then image order)."""
  n, c = scores.shape
  aps, weights = [], []
  for cls in range(c):
    num_pos = int(positive[:, cls].sum())
    if num_pos == 0:
      continue
    ranked = sorted(range(n), key=lambda i: (-scores[i, cls], i))[:k]
    hits, ap = 0, 0.0
    for rank, i in enumerate(ranked, start=1):
      if positive[i, cls]:
        hits += 1
        ap += hits / rank
    aps.append(ap / min(k, num_pos))
    weights.append(num_pos if weighting == "frequency" else 1.0)
  return float(np.dot(aps, weights) / np.sum(weights))


def test_map_by_hand():
  state = metrics.map_init(1, k=2)
  state = metrics.map_update(
    state, jnp.array([[0.9], [0.8], [0.7]]), jnp.array([[1], [0], [1]]), jnp.ones(3)
  )
  # Top 2 ranked images: positive, negative -> AP = (1/1) / min(2, 2 positives) = 0.5.
  np.testing.assert_allclose(metrics.map_result(state), 0.5)
  state = metrics.map_update(
    metrics.map_init(1, k=3),
    jnp.array([[0.9], [0.8], [0.7]]),
    jnp.array([[1], [0], [1]]),
    jnp.ones(3),
  )
  np.testing.assert_allclose(metrics.map_result(state), (1 / 1 + 2 / 3) / 2, rtol=1e-6)
  # No positives at all: undefined.
  assert np.isnan(metrics.map_result(metrics.map_init(3)))


def test_streaming_map_equals_brute_force_with_padding_and_ties():
  rng = np.random.default_rng(0)
  n, c, batch = 250, 9, 64  # 4 batches, the last padded with 6 rows
  scores = rng.integers(0, 12, size=(n, c)).astype(np.float32)  # coarse: many ties
  rates = np.array([0.0, 0.01, 0.05, 0.2, 0.5, 0.6, 0.8, 0.3, 0.1])  # class 0 never positive
  positive = rng.random((n, c)) < rates
  assert positive[:, 6].sum() > 100 and 0 < positive[:, 1].sum() < 100

  update = jax.jit(metrics.map_update)
  state = metrics.map_init(c)
  for start in range(0, n, batch):
    s, y = scores[start : start + batch], positive[start : start + batch]
    real = len(s)
    if real < batch:  # padding rows score highest and are all positive: they must not count
      s = np.concatenate([s, np.full((batch - real, c), 1e9, np.float32)])
      y = np.concatenate([y, np.ones((batch - real, c), bool)])
    mask = np.arange(batch) < real
    state = update(state, jnp.asarray(s), jnp.asarray(y.astype(np.int32)), jnp.asarray(mask))

  np.testing.assert_array_equal(state.num_positives, positive.sum(0))
  np.testing.assert_allclose(
    metrics.map_result(state), brute_force_map(scores, positive), rtol=1e-6
  )
  np.testing.assert_allclose(
    metrics.map_result(state, "frequency"),
    brute_force_map(scores, positive, weighting="frequency"),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    metrics.map_result(state, positive.sum(0).astype(np.float32)),
    metrics.map_result(state, "frequency"),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="map_class_weighting"):
    metrics.map_result(state, "inverse")


def test_map_update_on_globally_sharded_batch():
  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  rng = np.random.default_rng(1)
  n, c = 16 * len(devices), 5
  scores = rng.normal(size=(n, c)).astype(np.float32)
  positive = rng.random((n, c)) < 0.3
  mask = np.arange(n) < n - 3
  batch_sharding = NamedSharding(mesh, P("data"))
  args = [
    jax.device_put(jnp.asarray(x), batch_sharding)
    for x in (scores, positive.astype(np.int32), mask)
  ]
  state = jax.jit(metrics.map_update)(metrics.map_init(c), *args)
  counts = jax.jit(metrics.multilabel_counts)(*args)
  np.testing.assert_allclose(
    metrics.map_result(state), brute_force_map(scores[mask], positive[mask]), rtol=1e-6
  )
  np.testing.assert_allclose(counts["count"], n - 3)
