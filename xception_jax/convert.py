"""Imports Keras Xception and Inception V3 weight files into our modules, in three formats.

This is how users start from the published ImageNet weights (`keras_weights` fetches them:
`init_from=keras:xception`) or from a Keras model of their own. The format is recognised from the
file's content, not its name:
  * legacy Keras 2 HDF5 (`.h5`): what `keras.applications` publishes
    (`xception_weights_tf_dim_ordering_tf_kernels[_notop].h5`,
    `inception_v3_weights_tf_dim_ordering_tf_kernels[_notop].h5`) and tf-keras's
    `model.save_weights("x.h5")` writes: root attribute `layer_names`, per layer group an
    attribute `weight_names`, layers in the model's order;
  * Keras 3 `.weights.h5` (`model.save_weights`): variables under `layers/<key>/vars/<i>`, where
    the key is the layer's class in snake case numbered in the model's layer order (`conv2d`,
    `conv2d_1`, ..., `batch_normalization_3`; the layer's own name is an attribute of `vars`);
    the h5 groups themselves are unordered, so the file's layer order is rebuilt from our model's:
    the k-th `separable_conv2d` of the file is the k-th separable conv of the network in Keras's
    order, and so on per class;
  * Keras 3 `.keras` archives (`model.save`): a zip holding `config.json` and `model.weights.h5`
    in the Keras 3 layout above.

Layers are matched by their ORDER in the file, as Keras's own loader does, never by name: layer
names are auto-generated for most of Inception V3 (`conv2d_17`, `batch_normalization_17`) and the
published file numbers them from 1 while a model built today numbers from 0 (or from wherever the
session's counter stands). Keras stores a functional model's layers sorted by depth (longest path
to the output, deepest first), ties broken by the order a depth-first walk back from the output
meets them; that is neither creation order nor ours. For Inception V3 we rebuild the Keras layer
graph from the module's own description (`inception_v3.STEM` / `BLOCKS`) and sort it the same way;
for Xception we walk its description (`xception_arch.STEM` / `blocks`), putting each block's
shortcut conv after its main path (being closer to the output).

Layouts: Keras depthwise kernels are (3, 3, C, 1); our depthwise (grouped, C segments) kernels are
(3, 3, 1, C). Everything else has the same layout. Inception V3's batch norms have no scale.

The classifier: with the same class count it is imported; with a different class count (or when
the file has no top, or the model has extra `fc_layers`) the head is left for re-initialisation:
those leaves are freshly initialised the Keras way (glorot-uniform kernels, zero biases), a warning
names them, and `import_keras_h5` returns them in `KerasImport.reinitialized`. Any other shape
difference is an error naming the Keras layer, our layer and both shapes.

No TensorFlow here: the files are read with h5py.
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import io
import logging
import os
import re
import warnings
import zipfile
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np

from xception_jax.models import head
from xception_jax.models import inception_v3 as inception_v3_lib
from xception_jax.models import xception as xception_lib
from xception_jax.models import xception_arch

# Where one Keras weight goes in our variables: (collection, path inside it).
LeafPath = tuple[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class _Target:
  """One of our layers that takes one Keras layer's weights, listed in Keras's weight order.

  `depthwise` marks a (3, 3, C, 1) Keras depthwise kernel going into a (3, 3, 1, C) grouped one.
  `keras_class` is the Keras layer class in snake case, as Keras 3 files key their layers.
  """
  layer: str
  leaves: tuple[LeafPath, ...]
  keras_class: str
  depthwise: tuple[bool, ...] = ()

  def is_depthwise(self, i: int) -> bool:
    return bool(self.depthwise) and self.depthwise[i]


@dataclasses.dataclass(frozen=True)
class _KerasLayer:
  """A layer with weights, as stored in the file."""
  index: int  # position among the file's layers with weights
  name: str
  weight_names: tuple[str, ...]
  arrays: tuple[np.ndarray, ...]

  @property
  def shapes(self) -> list[tuple[int, ...]]:
    return [a.shape for a in self.arrays]


@dataclasses.dataclass(frozen=True)
class KerasImport:
  """The result of `import_keras_h5`.

  Attributes:
    variables: {'params', 'batch_stats'} for the model, complete (ready for `model.apply`).
    loaded: (Keras layer name, our layer) pairs that were imported, in file order.
    reinitialized: our leaves ("params/predictions/kernel", ...) that were initialised afresh
      because the file has no matching weights for them (the head, on a class-count change).
    ignored: Keras layers in the file that were not used (its classifier, for a headless model or
      a different class count).
  """
  variables: dict[str, Any]
  loaded: tuple[tuple[str, str], ...]
  reinitialized: tuple[str, ...]
  ignored: tuple[str, ...]


# --- Reading the file ----------------------------------------------------------------------------


def _decode(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


_ARCHIVE_WEIGHTS = "model.weights.h5"  # where a .keras archive keeps its variables
_FORMATS = ("a legacy Keras 2 .h5 weight file (keras.applications' published files, tf_keras "
            "save_weights), a Keras 3 .weights.h5 file (model.save_weights) or a Keras 3 .keras "
            "archive (model.save)")


def _open(path: str) -> h5py.File:
  """The HDF5 file at `path`, or inside it when it is a .keras archive; clear errors otherwise."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Keras weight file {path!r} does not exist")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      if _ARCHIVE_WEIGHTS not in names:
        raise ValueError(f"{path}: a zip archive without {_ARCHIVE_WEIGHTS} (it holds "
                         f"{names[:6]}); expected {_FORMATS}.")
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


def _read_legacy(group: h5py.Group) -> list[_KerasLayer]:
  """The layers with weights of the legacy layout, in stored (the model's) order."""
  result = []
  for name in (_decode(n) for n in group.attrs["layer_names"]):
    layer_group = group[name]
    weight_names = tuple(_decode(w) for w in layer_group.attrs.get("weight_names", ()))
    if not weight_names:
      continue
    arrays = tuple(_array(layer_group[w]) for w in weight_names)
    result.append(_KerasLayer(len(result), name, weight_names, arrays))
  return result


def _read_keras3(f: h5py.File, path: str, classes: Sequence[str]) -> list[_KerasLayer]:
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
        "itself (keras.applications, not nested inside another model)?")
  queues = {c: [key for _, key in sorted(keys)] for c, keys in by_class.items()}
  result = []
  for keras_class in list(classes) + ["dense"] * found.get("dense", 0):
    key = queues[keras_class].pop(0)
    variables = f["layers"][key]["vars"]
    names = sorted(variables, key=int)
    result.append(_KerasLayer(len(result), _decode(variables.attrs.get("name", key)),
                              tuple(f"layers/{key}/vars/{n}" for n in names),
                              tuple(_array(variables[n]) for n in names)))
  return result


def read_keras_file(path: str | os.PathLike, classes: Sequence[str]) -> list[_KerasLayer]:
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
  raise ValueError(f"{path}: no Keras weights in it (no root attribute 'layer_names' and no "
                   f"'layers' group); expected {_FORMATS}.")


def _is_dense(layer: _KerasLayer) -> bool:
  return [a.ndim for a in layer.arrays] == [2, 1]


# --- Keras's layer order -------------------------------------------------------------------------


class _KerasGraph:
  """A functional-model layer graph (one call per layer), enough to reproduce Keras's layer order.

  Every Keras layer counts, weighted or not (Input, Activation, pooling, Concatenate), because the
  order depends on path lengths.
  """

  def __init__(self):
    self.inputs: list[tuple[int, ...]] = []
    self.targets: list[_Target | None] = []

  def add(self, inputs: Sequence[int], target: _Target | None = None) -> int:
    self.inputs.append(tuple(inputs))
    self.targets.append(target)
    return len(self.inputs) - 1

  def keras_order(self, output: int) -> list[_Target]:
    """The weighted layers in `Functional.layers` order (tf_keras functional._map_graph_network)."""
    # Depth-first walk back from the output: pre-order index per layer; post-order node list.
    index: dict[int, int] = {}
    post_order: list[int] = []
    finished: set[int] = set()
    stack: list[tuple[int, int]] = [(output, 0)]  # (node, next input to visit); iterative DFS
    while stack:
      node, next_input = stack.pop()
      if next_input == 0:
        if node in finished:
          continue
        index.setdefault(node, len(index))
      if next_input < len(self.inputs[node]):
        stack.append((node, next_input + 1))
        child = self.inputs[node][next_input]
        if child not in finished:
          stack.append((child, 0))
      else:
        finished.add(node)
        post_order.append(node)
    # Depth: the longest path to the output (consumers are all visited before their producers).
    depth: dict[int, int] = {}
    for node in reversed(post_order):
      d = depth.setdefault(node, 0)
      for parent in self.inputs[node]:
        depth[parent] = max(depth.get(parent, 0), d + 1)
    ordered = sorted(post_order, key=lambda n: (-depth[n], index[n]))
    return [self.targets[n] for n in ordered if self.targets[n] is not None]


# --- Our side: the targets of each supported model ---------------------------------------------


def _conv(path: tuple[str, ...]) -> _Target:
  return _Target("/".join(path), (("params", path + ("kernel",)),), "conv2d")


def _batch_norm(path: tuple[str, ...], scale: bool = True) -> _Target:
  leaves = (("params", path + ("scale",)),) if scale else ()
  leaves += (("params", path + ("bias",)), ("batch_stats", path + ("mean",)),
             ("batch_stats", path + ("var",)))
  return _Target("/".join(path), leaves, "batch_normalization")


def _separable(name: str) -> _Target:
  return _Target(name, (("params", (name, "spatial", "kernel")),
                        ("params", (name, "pointwise", "kernel"))), "separable_conv2d",
                 depthwise=(True, False))


def _dense(name: str) -> _Target:
  return _Target(name, (("params", (name, "kernel")), ("params", (name, "bias"))), "dense")


def _inception_v3_body() -> list[_Target]:
  """Inception V3's conv and BN layers in the order Keras stores them."""
  graph = _KerasGraph()

  def conv_bn(x: int, path: tuple[str, ...]) -> int:
    x = graph.add([x], _conv(path + ("conv",)))
    x = graph.add([x], _batch_norm(path + ("bn",), scale=False))
    return graph.add([x])  # Activation("relu")

  def branch(x: int, ops: Sequence[Any], scope: str, index: int) -> int:
    for position, op in enumerate(ops):
      if isinstance(op, inception_v3_lib.Pool):
        x = graph.add([x])
      elif isinstance(op, inception_v3_lib.Fork):
        left = conv_bn(x, (scope, inception_v3_lib.conv_name(index, position, "a")))
        right = conv_bn(x, (scope, inception_v3_lib.conv_name(index, position, "b")))
        x = graph.add([left, right])  # Concatenate
      else:
        x = conv_bn(x, (scope, inception_v3_lib.conv_name(index, position)))
    return x

  x = graph.add([])  # InputLayer
  x = branch(x, inception_v3_lib.STEM, inception_v3_lib.STEM_NAME, 0)
  for name, branches in inception_v3_lib.BLOCKS:
    x = graph.add([branch(x, ops, name, b) for b, ops in enumerate(branches)])  # Concatenate
  # The head (global pooling, Dense) is one chain after this output: it shifts every depth by the
  # same amount, so the body's order is the same with and without it.
  return graph.keras_order(x)


def _xception_body(model: xception_lib.Xception) -> list[_Target]:
  """Xception's layers in the order Keras stores them.

  That is the order of the network's description, except that within a block Keras lists the main
  path before the 1x1 shortcut conv and its BN: the shortcut is the shorter path to the block's
  output, so it is shallower.
  """
  arch = model.architecture()
  bn = xception_arch.bn_name
  targets = []
  for conv in xception_arch.STEM:
    targets += [_conv((conv.name,)), _batch_norm((bn(conv.name),))]
  for block in xception_arch.blocks(arch.num_middle_blocks):
    for layer in block.layers:
      targets += [_separable(layer.name), _batch_norm((bn(layer.name),))]
    if arch.shortcut(block) == "conv":
      targets += [_conv((block.shortcut_name,)), _batch_norm((bn(block.shortcut_name),))]
  return targets


def _model_layout(model: nn.Module) -> tuple[str, list[_Target], int, str]:
  """(description, body targets in Keras order, minimum input size, classifier name)."""
  if isinstance(model, inception_v3_lib.InceptionV3):
    return ("Inception V3", _inception_v3_body(), inception_v3_lib.MIN_IMAGE_SIZE,
            head.CLASSIFIER_NAME)
  if isinstance(model, xception_lib.Xception):
    return "Xception", _xception_body(model), xception_arch.MIN_IMAGE_SIZE, head.CLASSIFIER_NAME
  raise TypeError(f"from_keras_h5 supports xception_jax Xception and InceptionV3 modules; got "
                  f"{type(model).__name__}")


# --- The import ------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict) or hasattr(tree, "items"):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, prefix + (key,)))
    return flat
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _fresh_leaf(path: tuple[str, ...], shape: tuple[int, ...], rng: jax.Array) -> np.ndarray:
  """Keras-style initial value: glorot-uniform kernels, zero biases and means, unit scales/vars."""
  leaf = path[-1]
  if leaf == "kernel":
    return np.asarray(nn.initializers.glorot_uniform()(rng, shape, jnp.float32))
  if leaf in ("scale", "var"):
    return np.ones(shape, np.float32)
  return np.zeros(shape, np.float32)


def _describe(layer: _KerasLayer) -> str:
  return f"Keras layer {layer.name!r} (layer {layer.index} with weights in the file)"


def _leaf_name(leaf: LeafPath) -> str:
  return "/".join((leaf[0],) + leaf[1])


def import_keras_h5(path: str | os.PathLike, model: nn.Module,
                    rng: jax.Array | None = None) -> KerasImport:
  """Reads a Keras weight file into `model`'s variables, matching layers by their order.

  Args:
    path: Keras Xception or Inception V3 weights, with or without top: a legacy Keras 2 HDF5
      file (keras.applications download, tf_keras `save_weights('x.h5')`), a Keras 3
      `.weights.h5` file or a Keras 3 `.keras` archive.
    model: our `Xception` (at its reference architecture: depthwise, depthwise-first, residual)
      or `InceptionV3` module; any class count, with or without head.
    rng: key for the leaves the file cannot provide (the head on a class-count change);
      default `jax.random.PRNGKey(0)`.

  Raises:
    ValueError: the file is not the expected layout, has a different number of layers than the
      model, or a layer's weights have a shape other than the model's (naming both).
  """
  description, body, min_size, classifier = _model_layout(model)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, min_size, min_size, 3), jnp.float32))
  expected = {(c,) + p: v.shape for c in abstract for p, v in _flatten(abstract[c]).items()}
  file_layers = read_keras_file(path, [target.keras_class for target in body])

  file_head = file_layers[-1] if file_layers and _is_dense(file_layers[-1]) else None
  file_body = file_layers[:-1] if file_head is not None else file_layers
  if len(file_body) != len(body):
    raise ValueError(
        f"{os.fspath(path)} has {len(file_body)} layers with weights before its classifier, "
        f"our {description} expects {len(body)}: is this a Keras {description} weight file, and "
        f"the model at its reference architecture? (file starts with "
        f"{[l.name for l in file_body[:3]]}, ends with {[l.name for l in file_body[-2:]]})")

  values: dict[tuple[str, ...], np.ndarray] = {}
  loaded: list[tuple[str, str]] = []

  def load(layer: _KerasLayer, target: _Target) -> None:
    if len(layer.arrays) != len(target.leaves):
      raise ValueError(
          f"{_describe(layer)} has {len(layer.arrays)} weights {list(layer.weight_names)}, but "
          f"our layer {target.layer!r} takes {len(target.leaves)}: "
          f"{[_leaf_name(l) for l in target.leaves]}")
    for i, (array, (collection, leaf)) in enumerate(zip(layer.arrays, target.leaves)):
      key = (collection,) + leaf
      if key not in expected:
        raise ValueError(f"{_describe(layer)}: our model has no {_leaf_name((collection, leaf))} "
                         "(is it at its reference architecture?)")
      value = np.transpose(array, (0, 1, 3, 2)) if target.is_depthwise(i) else array
      if value.shape != tuple(expected[key]):
        layout = f" (as {value.shape} in our layout)" if target.is_depthwise(i) else ""
        raise ValueError(
            f"Shape mismatch: {_describe(layer)} weight {layer.weight_names[i]!r} has shape "
            f"{array.shape}{layout}; our {_leaf_name((collection, leaf))} has shape "
            f"{tuple(expected[key])}")
      values[key] = value
    loaded.append((layer.name, target.layer))

  for layer, target in zip(file_body, body):
    load(layer, target)

  # The head: imported only when it is the same layer (same classes, no extra fc layers).
  ignored: list[str] = []
  has_classifier = ("params", classifier, "kernel") in expected
  has_fc = any(len(k) > 1 and k[0] == "params" and k[1].startswith("fc") for k in expected)
  reason = None
  if file_head is not None and has_classifier and not has_fc:
    file_shape = file_head.arrays[0].shape
    our_shape = tuple(expected[("params", classifier, "kernel")])
    if file_shape == our_shape:
      load(file_head, _dense(classifier))
    elif file_shape[0] == our_shape[0]:
      reason = (f"the file's classifier {file_head.name!r} has {file_shape[1]} classes, the model "
                f"{our_shape[1]}")
      ignored.append(file_head.name)
    else:
      raise ValueError(
          f"Shape mismatch: {_describe(file_head)} kernel has shape {file_shape}; our "
          f"params/{classifier}/kernel has shape {our_shape} (the input features differ, not "
          "just the class count)")
  elif file_head is not None:
    reason = ("the model has fc_layers before its classifier" if has_classifier
              else "the model is headless")
    ignored.append(file_head.name)
  elif has_classifier:
    reason = "the file has no classifier (include_top=False)"

  rng = jax.random.PRNGKey(0) if rng is None else rng
  missing = [k for k in expected if k not in values]
  not_head = [k for k in missing if k[1] != classifier and not k[1].startswith("fc")]
  if not_head:  # the layer tables above cover every body layer; this would be a bug in them
    raise RuntimeError(f"{description} import left body variables unset: "
                       f"{['/'.join(k) for k in not_head[:5]]}")
  for i, key in enumerate(sorted(missing)):
    values[key] = _fresh_leaf(key, tuple(expected[key]), jax.random.fold_in(rng, i))
  reinitialized = tuple("/".join(k) for k in sorted(missing))
  if reinitialized:
    message = (f"{os.fspath(path)}: head left for re-initialisation ({reason}); initialised "
               f"afresh: {', '.join(reinitialized)}")
    logging.warning(message)
    warnings.warn(message, stacklevel=2)
  elif ignored:
    logging.info("%s: not imported (%s): %s", os.fspath(path), reason, ", ".join(ignored))

  tree = _unflatten({k: jnp.asarray(v) for k, v in values.items()})
  variables = {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}
  return KerasImport(variables, tuple(loaded), reinitialized, tuple(ignored))


def from_keras_h5(path: str | os.PathLike, model: nn.Module,
                  rng: jax.Array | None = None) -> dict[str, Any]:
  """{'params', 'batch_stats'} for `model` from a Keras weight file (see import_keras_h5).

  A head that cannot be imported (different class count, no top in the file) is initialised
  afresh and a warning names it; use `import_keras_h5` to get the list programmatically.
  """
  return import_keras_h5(path, model, rng).variables
