"""Keras 3 files (`.weights.h5`, `.keras`): numerical parity with Keras 3 itself, and clear errors.

As tests/test_convert.py does for the legacy format: Keras 3's own Xception and Inception V3
(`weights=None`) get random weights and batch-norm statistics (tests/keras_reference.py), are
saved with `save_weights("x.weights.h5")` and `save("x.keras")`, and our import of each file must
give Keras 3's logits. Full-size networks at 75x75 (Inception V3's minimum) keep the forward
passes cheap; the layer count and order are those of the 299x299 network.
"""
from __future__ import annotations

import zipfile

import h5py
import jax
import numpy as np
import pytest

import keras_reference
from xception_jax import convert
from xception_jax import models

TOLERANCE = 1e-4  # as tests/test_convert.py
SIZE = 75


@pytest.fixture(scope="module", params=["xception", "inception_v3"])
def keras3_files(request, tmp_path_factory):
  """Per architecture: Keras 3's .weights.h5 and .keras of one random model, and its logits."""
  name = request.param
  directory = tmp_path_factory.mktemp(f"keras3_{name}")
  keras = keras_reference.keras3()
  model = keras_reference.randomized_model(name, include_top=True, input_shape=(SIZE, SIZE, 3),
                                           seed=5, keras_module=keras)
  images = np.random.default_rng(6).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  weights_path, archive_path = directory / "model.weights.h5", directory / "model.keras"
  model.save_weights(str(weights_path))
  model.save(str(archive_path))
  logits = keras_reference.predict(model, images)
  del model
  keras.backend.clear_session()
  return dict(name=name, weights=weights_path, archive=archive_path, images=images,
              logits=logits)


def test_keras3_files_match_keras3_logits(keras3_files):
  model = models.create(keras3_files["name"])
  from_weights = convert.import_keras_h5(keras3_files["weights"], model)
  from_archive = convert.import_keras_h5(keras3_files["archive"], model)
  assert from_weights.reinitialized == () and from_weights.ignored == ()
  assert from_weights.loaded == from_archive.loaded
  jax.tree.map(np.testing.assert_array_equal, from_weights.variables, from_archive.variables)
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      from_weights.variables, keras3_files["images"]))
  assert np.abs(keras3_files["logits"]).max() > 0.5
  assert float(np.abs(ours - keras3_files["logits"]).max()) <= TOLERANCE


def test_keras3_layers_are_named_by_keras_in_the_import_record(keras3_files):
  """The record names Keras's own layer names (stored as an attribute), in Keras's order."""
  result = convert.import_keras_h5(keras3_files["weights"],
                                   models.create(keras3_files["name"], num_classes=0))
  assert result.ignored == ("predictions",)
  if keras3_files["name"] == "xception":
    assert result.loaded[:3] == (("block1_conv1", "block1_conv1"),
                                 ("block1_conv1_bn", "block1_conv1_bn"),
                                 ("block1_conv2", "block1_conv2"))
    assert ("block13_sepconv2", "block13_sepconv2") in result.loaded


def test_keras3_file_of_the_other_architecture_is_refused(keras3_files):
  other = "xception" if keras3_files["name"] == "inception_v3" else "inception_v3"
  with pytest.raises(ValueError, match=r"its layers with weights are \{.*the model expects"):
    convert.import_keras_h5(keras3_files["archive"], models.create(other))


def test_unusable_files_get_a_clear_error(tmp_path):
  model = models.create("xception_tiny")
  with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
    archive.writestr("config.json", "{}")
  with pytest.raises(ValueError, match="zip archive without model.weights.h5"):
    convert.import_keras_h5(tmp_path / "other.keras", model)
  (tmp_path / "text.h5").write_text("not weights")
  with pytest.raises(ValueError, match="neither an HDF5 file nor a zip archive.*Keras 3 .keras"):
    convert.import_keras_h5(tmp_path / "text.h5", model)
  with h5py.File(tmp_path / "empty.weights.h5", "w") as f:
    f.create_group("layers")
  with pytest.raises(ValueError, match="layers with weights are {}"):
    convert.import_keras_h5(tmp_path / "empty.weights.h5", model)
