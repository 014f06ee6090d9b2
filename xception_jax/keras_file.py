"""Reads the layers with weights out of a Keras weight file, in the three formats Keras writes.

The format is recognised from the file's content, not its name:
  * legacy Keras 2 HDF5 (`.h5`): what `keras.applications` publishes
    (`xception_weights_tf_dim_ordering_tf_kernels[_notop].h5`,
    `inception_v3_weights_tf_dim_ordering_tf_kernels[_notop].h5`) and tf-keras's
    `model.save_weights("x.h5")` writes: root attribute `layer_names`, per layer group an
    attribute `weight_names`, layers in the model's order;
  * Keras 3 `.weights.h5` (`model.save_weights`): variables under `layers/<key>/vars/<i>`, where
    the key is the layer's class in snake case numbered in the model's layer order (`conv2d`,
    `conv2d_1`, ..., `batch_normalization_3`; the layer's own name is an attribute of `vars`);
    the h5 groups themselves are unordered, so the file's layer order is rebuilt from the model's:
    the k-th `separable_conv2d` of the file is the k-th separable conv of the network in Keras's
    order, and so on per class;
  * Keras 3 `.keras` archives (`model.save`): a zip holding `config.json` and `model.weights.h5`
    in the Keras 3 layout above.

Separate from `convert.py`, which decides where each layer goes in our modules: this file only
knows Keras's storage, and reads it with h5py (no TensorFlow, no Keras).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import io
import os
import re
from typing import Any
import zipfile

import h5py
import numpy as np


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """A layer with weights, as stored in the file."""

  index: int  # position among the file's layers with weights
  name: str
  weight_names: tuple[str, ...]
  arrays: tuple[np.ndarray, ...]

  @property
  def shapes(self) -> list[tuple[int, ...]]:
    return [a.shape for a in self.arrays]


def _decode(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


_ARCHIVE_WEIGHTS = "model.weights.h5"  # where a .keras archive keeps its variables
_FORMATS = (
  "a legacy Keras 2 .h5 weight file (keras.applications' published files, tf_keras "
  "save_weights), a Keras 3 .weights.h5 file (model.save_weights) or a Keras 3 .keras "
  "archive (model.save)"
)


def _open(path: str) -> h5py.File:
  """The HDF5 file at `path`, or inside it when it is a .keras archive; clear errors otherwise."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Keras weight file {path!r} does not exist")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if _ARCHIVE_WEIGHTS not in names:
        raise ValueError(
          f"{path}: a zip archive without {_ARCHIVE_WEIGHTS} (it holds "
          f"{names[:6]}); expected {_FORMATS}."
        )
      return h5py.File(io.BytesIO(archive.read(_ARCHIVE_WEIGHTS)), "r")
  if not h5py.is_hdf5(path):
    raise ValueError(f"{path}: neither an HDF5 file nor a zip archive; expected {_FORMATS}.")
  return h5py.File(path, "r")


def _array(dataset: h5py.Dataset) -> np.ndarray:
  value = np.asarray(dataset[()])
  if dataset.attrs.get("dtype") == "bfloat16":  # Keras 3 stores bfloat16 variables as raw 2 bytes
    import ml_dtypes  # pylint: disable=g-import-not-at-top

    value = value.view(ml_dtypes.bfloat16)
  return value.astype(np.float32)


def _read_legacy(group: h5py.Group) -> list[KerasLayer]:
  """The layers with weights of the legacy layout, in stored (the model's) order."""
  result = []
  for name in (_decode(n) for n in group.attrs["layer_names"]):
    layer_group = group[name]
    weight_names = tuple(_decode(w) for w in layer_group.attrs.get("weight_names", ()))
    if not weight_names:
      continue
    arrays = tuple(_array(layer_group[w]) for w in weight_names)
    result.append(KerasLayer(len(result), name, weight_names, arrays))
  return result


def _read_keras3(f: h5py.File, path: str, classes: Sequence[str]) -> list[KerasLayer]:
  """The layers of a Keras 3 weights file, put in the model's order (see the module docstring).

  `classes` lists the Keras class of each of our body layers in Keras's order; a trailing
  `dense` layer in the file is the classifier.
  """
  by_class: dict[str, list[tuple[int, str]]] = {}
  for key, group in f["layers"].items():
    if len(group.get("vars", ())):
      match = re.fullmatch(r"(.+?)(?:_(\d+))?", key)
      by_class.setdefault(match.group(1), []).append((int(match.group(2) or 0), key))
  found = {c: len(keys) for c, keys in sorted(by_class.items())}
  wanted = {c: classes.count(c) for c in sorted(set(classes))}
  if {c: n for c, n in found.items() if c != "dense"} != wanted or found.get("dense", 0) > 1:
    raise ValueError(
      f"{path}: its layers with weights are {found}, the model expects {wanted} (plus at most "
      "one dense classifier). Is this a Keras file of this network, saved from the model "
      "itself (keras.applications, not nested inside another model)?"
    )
  queues = {c: [key for _, key in sorted(keys)] for c, keys in by_class.items()}
  result = []
  for keras_class in list(classes) + ["dense"] * found.get("dense", 0):
    key = queues[keras_class].pop(0)
    variables = f["layers"][key]["vars"]
    names = sorted(variables, key=int)
    result.append(
      KerasLayer(
        len(result),
        _decode(variables.attrs.get("name", key)),
        tuple(f"layers/{key}/vars/{n}" for n in names),
        tuple(_array(variables[n]) for n in names),
      )
    )
  return result


def read_keras_file(path: str | os.PathLike, classes: Sequence[str]) -> list[KerasLayer]:
  """The layers with weights of a Keras weight file (any of the three formats), in model order.

  `classes`: the Keras class of each body layer of the model, in Keras's order; used only to
  order a Keras 3 file's layers (a legacy file stores its order).
  """
  path = os.fspath(path)
  with _open(path) as f:
    group = f
    if "layer_names" not in f.attrs and "model_weights" in f:
      group = f["model_weights"]  # a full-model file from tf_keras model.save("x.h5")
    if "layer_names" in group.attrs:
      return _read_legacy(group)
    if "layers" in f:
      return _read_keras3(f, path, classes)
  raise ValueError(
    f"{path}: no Keras weights in it (no root attribute 'layer_names' and no "
    f"'layers' group); expected {_FORMATS}."
  )
