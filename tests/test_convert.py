"""Keras .h5 import: numerical parity with keras.applications, head handling, clear errors.

The reference models have random weights and batch-norm statistics (tests/keras_reference.py) and
are written with tf_keras save_weights, the layout of the published ImageNet files. Each Keras
model is built once per module (a few seconds each); our side compiles one forward pass per case.
"""

from __future__ import annotations

import h5py
import jax
import keras_reference
import numpy as np
import pytest

from xception_jax import convert
from xception_jax import keras_file
from xception_jax import models

TOLERANCE = 1e-4  # max |difference| in float32, logits and feature maps O(1..10)
HEADLESS_SHAPE = (1, 235, 299, 3)  # non-square: odd and even sizes through every stride-2 layer


def _images(shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


@pytest.fixture(scope="module", params=["inception_v3", "xception"])
def reference(request, tmp_path_factory):
  """Per architecture: the with-top and headless .h5 files and Keras's outputs on fixed inputs."""
  name = request.param
  directory = tmp_path_factory.mktemp(name)
  images_299 = _images((2, 299, 299, 3), seed=1)
  images_headless = _images(HEADLESS_SHAPE, seed=2)

  top = keras_reference.randomized_model(name, include_top=True, seed=3)
  top_path = keras_reference.save_h5(top, directory, "top.h5")
  logits = keras_reference.predict(top, images_299)
  del top
  notop = keras_reference.randomized_model(name, include_top=False, seed=4)
  notop_path = keras_reference.save_h5(notop, directory, "notop.h5")
  features = keras_reference.predict(notop, images_headless)
  del notop
  return dict(
    name=name,
    top=top_path,
    notop=notop_path,
    images_299=images_299,
    logits=logits,
    images_headless=images_headless,
    features=features,
  )


def _max_diff(model, variables, images, expected) -> float:
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
  assert ours.shape == expected.shape
  assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero outputs
  return float(np.abs(ours - expected).max())


def test_logits_match_keras_at_299(reference):
  model = models.create(reference["name"])
  result = convert.import_keras_h5(reference["top"], model)
  assert result.reinitialized == () and result.ignored == ()
  assert (
    _max_diff(model, result.variables, reference["images_299"], reference["logits"]) <= TOLERANCE
  )


def test_headless_feature_map_matches_keras_non_square(reference):
  model = models.create(reference["name"], num_classes=0)
  result = convert.import_keras_h5(reference["notop"], model)
  assert result.reinitialized == () and result.ignored == ()
  assert reference["features"].shape[-1] == 2048
  assert (
    _max_diff(model, result.variables, reference["images_headless"], reference["features"])
    <= TOLERANCE
  )


def test_different_class_count_leaves_head_for_reinitialisation(reference):
  full = convert.import_keras_h5(reference["top"], models.create(reference["name"]))
  with pytest.warns(UserWarning, match="re-initialisation.*1000 classes, the model 10"):
    result = convert.import_keras_h5(
      reference["top"], models.create(reference["name"], num_classes=10)
    )
  assert result.reinitialized == ("params/predictions/bias", "params/predictions/kernel")
  assert result.ignored == ("predictions",)
  head = result.variables["params"]["predictions"]
  assert head["kernel"].shape == (2048, 10) and float(np.abs(head["kernel"]).max()) > 0
  np.testing.assert_array_equal(head["bias"], np.zeros(10))
  # Everything but the head is exactly what the 1000-class import gives.
  body = lambda v: {c: {k: t for k, t in v[c].items() if k != "predictions"} for c in v}
  jax.tree.map(np.testing.assert_array_equal, body(result.variables), body(full.variables))


def test_file_without_top_initialises_the_models_head(reference):
  with pytest.warns(UserWarning, match="no classifier"):
    result = convert.import_keras_h5(
      reference["notop"], models.create(reference["name"], num_classes=5)
    )
  assert result.reinitialized == ("params/predictions/bias", "params/predictions/kernel")


def test_headless_model_ignores_the_files_classifier(reference):
  result = convert.import_keras_h5(
    reference["top"], models.create(reference["name"], num_classes=0)
  )
  assert result.ignored == ("predictions",) and result.reinitialized == ()
  assert "predictions" not in result.variables["params"]


def test_fc_layers_are_initialised_with_the_head(reference):
  with pytest.warns(UserWarning, match="fc_layers"):
    result = convert.import_keras_h5(
      reference["top"], models.create(reference["name"], num_classes=10, fc_layers=(16,))
    )
  assert result.reinitialized == (
    "params/fc1/bias",
    "params/fc1/kernel",
    "params/predictions/bias",
    "params/predictions/kernel",
  )


def _renamed_copy(source, destination):
  """The same weights under different layer names, in the same order (as in published files)."""
  with h5py.File(source, "r") as src, h5py.File(destination, "w") as dst:
    # bytes or str by h5py version
    names = [keras_file._decode(n) for n in src.attrs["layer_names"]]
    new_names = [f"layer_{len(names) - i}" for i in range(len(names))]
    for old, new in zip(names, new_names):
      group = dst.create_group(new)
      weight_names = []
      for weight_name in src[old].attrs["weight_names"]:
        renamed = keras_file._decode(weight_name).replace(old, new, 1)
        group.create_dataset(renamed, data=src[old][weight_name][()])
        weight_names.append(renamed.encode())
      group.attrs["weight_names"] = weight_names
    dst.attrs["layer_names"] = [n.encode() for n in new_names]
    for key in ("backend", "keras_version"):
      if key in src.attrs:
        dst.attrs[key] = src.attrs[key]
  return destination


def test_layers_are_matched_by_order_not_name(reference, tmp_path):
  model = models.create(reference["name"], num_classes=0)
  original = convert.import_keras_h5(reference["notop"], model)
  renamed = convert.import_keras_h5(_renamed_copy(reference["notop"], tmp_path / "r.h5"), model)
  numbers = [int(keras_name.removeprefix("layer_")) for keras_name, _ in renamed.loaded]
  assert numbers == sorted(numbers, reverse=True)  # file order, whatever the names say
  assert [ours for _, ours in renamed.loaded] == [ours for _, ours in original.loaded]
  jax.tree.map(np.testing.assert_array_equal, renamed.variables, original.variables)


def test_shape_mismatch_names_the_layer_and_both_shapes(reference):
  if reference["name"] == "inception_v3":
    model = models.create("inception_v3", width_multiplier=0.5)
    expected = r"'conv2d'.*\(3, 3, 3, 32\).*stem/branch0_0/conv/kernel.*\(3, 3, 3, 16\)"
  else:  # a regular 3x3 conv (1 segment) where Keras has a depthwise one
    model = models.create("xception", segments=1)
    expected = (
      r"'block2_sepconv1'.*\(3, 3, 64, 1\) \(as \(3, 3, 1, 64\) in our layout\)"
      r".*block2_sepconv1/spatial/kernel.*\(3, 3, 64, 64\)"
    )
  with pytest.raises(ValueError, match=expected):
    convert.import_keras_h5(reference["top"], model)


def test_file_of_the_other_architecture_is_refused(reference):
  other = "xception" if reference["name"] == "inception_v3" else "inception_v3"
  with pytest.raises(ValueError, match="layers with weights before its classifier"):
    convert.import_keras_h5(reference["top"], models.create(other))


def test_not_a_keras_weight_file(tmp_path):
  path = tmp_path / "other.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(ValueError, match="layer_names"):
    convert.from_keras_h5(path, models.create("inception_v3"))
  with pytest.raises(FileNotFoundError, match="missing.h5"):
    convert.from_keras_h5(tmp_path / "missing.h5", models.create("inception_v3"))
