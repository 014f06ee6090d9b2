"""Inception V3: Keras's exact parameter counts, shapes, settings checks, and the module contract.

Numerical parity with Keras lives in test_convert.py; this file needs no TensorFlow. Counts and
shapes come from jax.eval_shape (no compile); one tiny model is compiled for the train/eval
contract.
Its variables are drawn with numpy on the shapes `init` gives, not by a compiled `init`: on CPU,
compiling the ~100 threefry draws of an Inception V3 init costs ~20 s of CPU, longer than the rest
of this file, and the values themselves are not what is tested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import models
from xception_jax.models import inception_v3
from xception_jax.models import layers


def _abstract_variables(model, shape=(1, 299, 299, 3)):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _random_variables(abstract, seed: int = 0):
  """Concrete variables with the structure and shapes of `abstract` (positive variances)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _leaf_names(tree) -> set[str]:
  return {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_and_batch_stat_counts_match_keras():
  variables = _abstract_variables(models.create("inception_v3"))
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["params"]) == 23_817_352
  assert _count(variables["batch_stats"]) == 34_432
  headless = _abstract_variables(models.create("inception_v3", num_classes=0))
  assert _count(headless["params"]) == 21_768_352  # Keras include_top=False
  assert _count(headless["batch_stats"]) == 34_432


def test_leaf_names_weight_decay_and_batch_norm_without_scale():
  variables = _abstract_variables(models.create("inception_v3"))
  # Convs and the classifier have `kernel` (the leaves weight decay applies to); the batch norms
  # have only a bias (Keras's scale=False); statistics are mean / var.
  assert _leaf_names(variables["params"]) == {"kernel", "bias"}
  assert _leaf_names(variables["batch_stats"]) == {"mean", "var"}
  assert len(variables["batch_stats"]) == 1 + 11  # stem + mixed0..mixed10
  assert variables["params"]["predictions"]["kernel"].shape == (2048, 1000)


@pytest.mark.parametrize(
  "height, width, grid",
  [(299, 299, (8, 8)), (235, 299, (6, 8)), (75, 75, (1, 1)), (300, 76, (8, 1))],
)
def test_headless_returns_the_mixed10_feature_map(height, width, grid):
  model = models.create("inception_v3", num_classes=None)
  variables = _abstract_variables(model, (1, height, width, 3))
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, height, width, 3)))
  assert out.shape == (2, *grid, 2048) and out.dtype == jnp.float32


def test_input_smaller_than_75_fails_before_compile():
  model = models.create("inception_v3")
  with pytest.raises(ValueError, match=r"74x299 is too small.*at least 75"):
    _abstract_variables(model, (1, 74, 299, 3))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(num_classes=-1), "num_classes"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(width_multiplier=0), "width_multiplier"),
    (dict(fc_layers=(0,)), "fc_layers"),
    (dict(num_classes=0, fc_layers=(16,)), "fc_layers"),
    (dict(dtype="float64"), "float64"),
  ],
)
def test_invalid_settings_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.create("inception_v3", **kwargs)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  model = models.create("inception_v3", dtype="bfloat16", num_classes=10)
  variables = _abstract_variables(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(model.apply, variables, jnp.zeros((2, 299, 299, 3)))
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_average_pool_divides_by_the_real_pixels_only():
  # TF's avg_pool excludes padding: a constant image stays constant up to the borders. Counting
  # the padding (the Flax/PyTorch default) would give 4/9 in the corners and 6/9 on the edges.
  pooled = inception_v3.pool(jnp.full((1, 5, 4, 2), 3.0), "avg")
  np.testing.assert_allclose(pooled, np.full((1, 5, 4, 2), 3.0), rtol=1e-6)
  ramp = jnp.arange(4.0).reshape(1, 1, 4, 1) * jnp.ones((1, 3, 4, 1))
  # Top-left corner: mean over the 2x2 real window {0, 1} x 2 rows = 0.5.
  assert float(inception_v3.pool(ramp, "avg")[0, 0, 0, 0]) == pytest.approx(0.5)


def test_tiny_variant_init_apply_and_train_contract():
  model = models.create("inception_v3_tiny", num_classes=10, dropout_rate=0.5, fc_layers=(32,))
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 80, 80, 3), minval=-1, maxval=1)
  variables = _random_variables(_abstract_variables(model, images.shape))
  assert set(variables) == {"params", "batch_stats"}
  assert _count(variables["params"]) < 1_000_000

  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))

  train = jax.jit(
    lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
  )
  out_a, updates = train(variables, images, jax.random.PRNGKey(2))
  out_b, _ = train(variables, images, jax.random.PRNGKey(3))
  assert out_a.shape == (2, 10) and out_a.dtype == jnp.float32
  assert not np.allclose(out_a, out_b)  # dropout draws from the given key
  old, new = variables["batch_stats"]["stem"], updates["batch_stats"]["stem"]
  assert jax.tree.structure(old) == jax.tree.structure(new)
  assert not np.allclose(old["branch0_0"]["bn"]["mean"], new["branch0_0"]["bn"]["mean"])


def test_convs_and_max_pools_take_the_cpu_formulations_table(monkeypatch):
  """Every conv and stride-2 max pool goes through `layers` (the CPU rewrites, native elsewhere).

  Only traced (eval_shape): the rewrites' values and gradients against the native ops, for these
  kernel shapes (1x1, 3x3, 5x5, 1x7, 7x1, strided, VALID), are tests/test_cpu_formulations.py's.
  """
  kinds = []
  by_table = layers._by_table  # pylint: disable=protected-access

  def recording(kind, *args):
    kinds.append(kind)
    return by_table(kind, *args)

  model = models.create("inception_v3_tiny", num_classes=10)
  images = jnp.zeros((2, 75, 75, 3))
  variables = _abstract_variables(model, images.shape)
  monkeypatch.setattr(layers, "_by_table", recording)
  jax.eval_shape(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]), variables)
  convs = [k for k in kinds if k != "max_pool"]
  assert len(convs) == 94  # every conv2d_bn (one per BatchNorm)
  assert {"pointwise", "regular"} == set(convs)
  assert kinds.count("max_pool") == 4  # two in the stem, one each in mixed3 and mixed8
