"""Keras Applications reference models with random weights, for the parity tests.

The published ImageNet weights cannot be downloaded in tests (offline), and freshly initialised
Keras models would make a weak test: biases and batch-norm statistics start at 0 and 1, so a
converter that dropped them, or swapped two of them, would still agree. Every weight here,
batch-norm moving statistics included, is drawn at random (He-scaled kernels and batch-norm
scales below 1, so that activations and logits stay O(1) through ~100 layers and 12 residual
sums, and a 1e-4 tolerance means something), and the model is saved with tf_keras
`save_weights(...h5)`, which writes the same legacy layout as the published files.

The same random weights go into Keras 3 models (`keras_module=keras3()`), saved with Keras 3's
`save_weights(...weights.h5)` and `save(...keras)`, for the parity tests of those formats.

Only tests import this module (it imports TensorFlow).
"""
from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tf_keras  # pylint: disable=g-import-not-at-top

APPLICATIONS = {"xception": "Xception", "inception_v3": "InceptionV3"}


def keras3():
  """Keras 3, on the TensorFlow backend unless KERAS_BACKEND says otherwise: it builds these
  models in about a second where the JAX backend takes 15-30 s (eager initialisers)."""
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras  # pylint: disable=g-import-not-at-top
  return keras


def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  leaf = name.split("/")[-1].split(":")[0]
  if leaf in ("kernel", "depthwise_kernel", "pointwise_kernel"):
    fan_in = int(np.prod(shape[:-1])) if leaf != "depthwise_kernel" else int(np.prod(shape[:2]))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
  if leaf == "gamma":  # below 1 so that Xception's residual sums stay O(1) over 12 blocks
    return rng.uniform(0.3, 0.8, shape)
  if leaf == "moving_variance":
    return rng.uniform(0.5, 2.0, shape)
  if leaf in ("beta", "moving_mean", "bias"):
    return rng.normal(0.0, 0.2, shape)
  raise ValueError(f"no random rule for Keras weight {name!r}")


def randomized_model(name: str, *, include_top: bool, classes: int = 1000,
                     input_shape: tuple[int, int, int] | None = None, seed: int = 0,
                     keras_module=tf_keras):
  """A keras.applications model (no download) with every weight and BN statistic random.

  `keras_module`: tf_keras (Keras 2, the default) or `keras3()`.
  """
  keras_module.backend.clear_session()
  kwargs = dict(weights=None, include_top=include_top, input_shape=input_shape)
  if include_top:
    kwargs.update(classes=classes, classifier_activation=None)
  model = getattr(keras_module.applications, APPLICATIONS[name])(**kwargs)
  rng = np.random.default_rng(seed)
  model.set_weights([_random_value(w.name, tuple(w.shape), rng).astype(np.float32)
                     for w in model.weights])
  return model


def save_h5(model, directory: pathlib.Path, filename: str) -> pathlib.Path:
  """Writes the legacy Keras 2 HDF5 weight layout (as keras.applications publishes it)."""
  path = pathlib.Path(directory) / filename
  model.save_weights(str(path))
  return path


def predict(model, images: np.ndarray) -> np.ndarray:
  """The reference output in inference mode (moving statistics, no dropout), float32."""
  return np.asarray(model(images, training=False), np.float32)


def save_as_keras_h5(model, variables: dict, path: pathlib.Path, *,
                     include_top: bool = True) -> pathlib.Path:
  """Writes OUR model's variables in the legacy Keras layout the published files use.

  For networks Keras does not build (xception_tiny): a Keras-format file whose weights carry
  information, e.g. after a short pre-training run. Layers go in Keras's order (the converter's
  own table, `convert._model_layout`), depthwise kernels in Keras's (3, 3, C, 1) layout, one
  group per layer with its `weight_names`, as tf_keras writes them. `include_top=False` leaves
  the classifier out (as the `_notop` files do).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  from xception_jax import convert  # pylint: disable=g-import-not-at-top

  _, targets, _, classifier = convert._model_layout(model)  # pylint: disable=protected-access
  if include_top:
    targets = list(targets) + [convert._dense(classifier)]  # pylint: disable=protected-access
  with h5py.File(path, "w") as f:
    layer_names = []
    for i, target in enumerate(targets):
      name = f"layer_{i}"
      group = f.create_group(name)
      weight_names = []
      for j, (collection, leaf) in enumerate(target.leaves):
        value = variables[collection]
        for key in leaf:
          value = value[key]
        value = np.asarray(value, np.float32)
        if target.is_depthwise(j):
          value = np.transpose(value, (0, 1, 3, 2))
        weight_name = f"{name}/weight_{j}:0"
        group.create_dataset(weight_name, data=value)
        weight_names.append(weight_name.encode())
      group.attrs["weight_names"] = weight_names
      layer_names.append(name.encode())
    f.attrs["layer_names"] = layer_names
  return pathlib.Path(path)
