"""Export a trained run for inference, and load the export back as a predictor.

    python -m xception_jax.export --workdir=RUN_DIR --out=EXPORT_DIR [--checkpoint=latest|best|STEP]
        [--raw-weights]
    python -m xception_jax.export --from=keras:xception --out=EXPORT_DIR   # ImageNet, no training

    from xception_jax import export
    predictor = export.load("EXPORT_DIR")
    probabilities = predictor.predict(["cat.jpg", uint8_hwc_array])   # float32 [2, num_classes]

An export directory is self-contained: the people who serve a model should not need this
package's model code, its configs, or the checkpoint layout of the run that trained it.

  export.json          metadata: model name and settings, input size, the exact preprocessing,
                       class names, single-/multi-label, source run, step and date, library
                       versions, the export format version, and a size + sha256 per file.
  variables.npz        the inference variables as float32 numpy arrays, one per leaf, named
                       'params/<layer>/<leaf>' and 'batch_stats/<layer>/<leaf>' as in the Flax
                       model. EMA (Polyak-averaged) weights by default, as the paper evaluates;
                       `--raw-weights` exports the trained weights instead.
  inference.jaxexport  a serialized `jax.export` (StableHLO) function
                       f(variables, images) -> {'logits', 'probabilities'} with a symbolic batch
                       dimension, lowered for cpu, cuda and tpu; `jax.export.deserialize` runs it
                       with nothing but jax installed.
  saved_model/         (when TensorFlow is importable) the same function through jax2tf's native
                       serialization, for TF Serving: `serving_default` takes encoded image bytes
                       (string [batch]) and applies the eval preprocessing in TF;
                       `predict_images` takes preprocessed float32 [batch, S, S, 3].

Design choices, and why:
  * Batch norm is NOT folded into the convolutions. Folding changes the arithmetic (the product
    scale * rsqrt(var + eps) * kernel is rounded differently), and the export is promised to
    match evaluation within 1e-5 (on CPU it is exact); XLA already fuses the eval-mode
    batch-norm affine into the convolution's epilogue, so folding would save little at run time.
    Unfolded variables also keep the checkpoint's names, so they can be loaded back into the
    Flax model (`flax.traverse_util.unflatten_dict(dict(np.load(f)), sep='/')`) to fine-tune.
  * The variables are arguments of the exported function, not constants inside it: the
    StableHLO stays small (kilobytes, not Xception's 90 MB of weights; constants that large slow
    compilation and hit protobuf's 2 GB limit in the SavedModel for bigger models), and the
    weights remain plain numpy arrays that any tool can read.
  * The function returns both the logits (for calibration, ensembling, distillation) and the
    probabilities (softmax, or sigmoid for multi-label runs, per run.json's `loss`).
  * The input is the already preprocessed batch: float32 [batch, S, S, 3], RGB, NHWC, in [-1, 1].
    Decoding and resizing are data-dependent in shape, so they stay outside the StableHLO (in
    numpy/PIL here: `xception_jax.data.eval_preprocess`, the twin of the TF eval path).
  * The directory is written under a temporary name and renamed when complete, so a crash never
    leaves something that looks like an export; `load` also checks every file's size and hash.

Loading (`load`, `Predictor`) imports only numpy, PIL, jax and the numpy preprocessing: no Flax,
no model code, no TensorFlow, no orbax. The export side imports those lazily. Without this
package at all:

    exported = jax.export.deserialize(bytearray(open(f"{d}/inference.jaxexport", "rb").read()))
    outputs = exported.call(dict(np.load(f"{d}/variables.npz")), preprocessed_images)
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xception_jax import paths
from xception_jax.data import eval_preprocess

FORMAT_NAME = "xception_jax.export"
# Bump when a reader of the previous version could misread a new export (new required file,
# changed variable naming, changed function signature). Additive metadata keys do not need it.
FORMAT_VERSION = 1

METADATA_FILE = "export.json"
VARIABLES_FILE = "variables.npz"
FUNCTION_FILE = "inference.jaxexport"
SAVED_MODEL_DIR = "saved_model"

EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")
OUTPUT_ACTIVATIONS = {"softmax": jax.nn.softmax, "sigmoid": jax.nn.sigmoid}

# Predictor batching: batches are padded to a power of two (at most `max_batch_size`), so a
# stream of arbitrary batch sizes compiles at most log2(max_batch_size) + 1 shapes.
DEFAULT_MAX_BATCH_SIZE = 32

PathLike = str | os.PathLike
ImageInput = np.ndarray | PathLike | bytes


class ExportFormatError(ValueError):
  """An export directory that cannot be used: missing, incomplete, corrupted or incompatible."""


class ImageError(ValueError):
  """One input image that could not be read or preprocessed; `source` names it."""

  def __init__(self, source: str, reason: str):
    super().__init__(f"{source}: {reason}")
    self.source = source
    self.reason = reason


# ----------------------------------------------------------------------------------------------
# The inference function (shared by the export and its tests).
# ----------------------------------------------------------------------------------------------


def flatten_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/layer/leaf': leaf}, sorted by name."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top  (export side only)
  flat = traverse_util.flatten_dict(
      {k: variables[k] for k in ("params", "batch_stats") if variables.get(k)}, sep="/")
  return dict(sorted(flat.items()))


def inference_function(model, loss: str) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
  """f(flat_variables, images) -> {'logits', 'probabilities'}: the eval-mode forward pass.

  `loss` ('softmax' | 'sigmoid', as in run.json) picks the output activation.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  if loss not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"loss={loss!r}: valid output activations are {sorted(OUTPUT_ACTIVATIONS)}.")
  activation = OUTPUT_ACTIVATIONS[loss]

  def infer(flat_variables: dict[str, jax.Array], images: jax.Array) -> dict[str, jax.Array]:
    variables = traverse_util.unflatten_dict(flat_variables, sep="/")
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return {"logits": logits, "probabilities": activation(logits)}

  return infer


def export_function(infer: Callable, flat_variables: dict[str, np.ndarray],
                    image_size: int) -> "jax.export.Exported":
  """Lowers `infer` to StableHLO with a symbolic batch dimension 'b', for cpu, cuda and tpu."""
  batch, = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_variables.items()}
  return jax.export.export(jax.jit(infer), platforms=EXPORT_PLATFORMS)(variables, images)


# ----------------------------------------------------------------------------------------------
# Export: training workdir -> export directory.
# ----------------------------------------------------------------------------------------------


def read_run(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config.json, run.json) of a training workdir, with an error naming what is missing."""
  result = []
  for name in ("config.json", "run.json"):
    path = paths.resolve(workdir) / name
    if not path.is_file():
      raise FileNotFoundError(
          f"{path} not found: --workdir must be a training run's folder (written by "
          "`python -m xception_jax.main`), holding config.json, run.json and checkpoints/.")
    result.append(paths.read_json(path))
  return result[0], result[1]


def _check_variables_match(model_name: str, expected: dict, loaded: dict,
                           source: dict[str, Any]) -> None:
  """The checkpoint must hold exactly the variables the configured model has."""
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  wrong = sorted(k for k in set(expected) & set(loaded)
                 if tuple(expected[k].shape) != tuple(np.shape(loaded[k])))
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
      details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k in wrong[:5]:
      details.append(f"{k}: checkpoint {np.shape(loaded[k])} vs model {tuple(expected[k].shape)}")
    raise ValueError(
        f"The weights ({', '.join(f'{k}={v}' for k, v in source.items() if k != 'trained_with')}) "
        f"do not match the model the config describes ({model_name}): {'; '.join(details)}.")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    package = metadata.version("xception_jax")
  except metadata.PackageNotFoundError:
    package = "source checkout"
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__,
          "xception_jax": package}


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def export_run(workdir: str, out: str, *, step: int | str | None = None, use_ema: bool = True,
               saved_model: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes the export directory `out` from the training run in `workdir`; returns its metadata.

  Args:
    workdir: a training workdir (config.json, run.json, checkpoints/<step>/), local or gs://.
    out: the export directory to create (local or gs://).
    step: the checkpoint: an int, 'latest' (None) or 'best' (by run.json's best_metric).
      While the run trains, a checkpoint it deletes during the read is picked again
      (latest/best) or reported in one line (a fixed step).
    use_ema: export the EMA weights (default, what evaluation reports) or the raw ones.
    saved_model: also write a TF SavedModel. None = when TensorFlow is importable; True = required
      (error without TensorFlow); False = never.
    overwrite: replace `out` if it is an earlier export (never any other non-empty folder).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top  (export side only)
  from xception_jax import checkpointing  # pylint: disable=g-import-not-at-top

  workdir = os.fspath(paths.resolve(workdir))
  _check_out_dir(out, overwrite)  # before the (slow) checkpoint read
  config_dict, run = read_run(workdir)
  best_metric = run.get("best_metric") or config_dict.get("best_metric") or (
      "eval/ema_map100" if run.get("multi_label") else "eval/ema_top1")
  state = checkpointing.load_variables(workdir, step, use_ema=use_ema, best_metric=best_metric)
  source = {"workdir": workdir, "step": int(state["step"]),
            "checkpoint": "latest" if step is None else str(step),
            "weights": "ema" if use_ema else "raw",
            "trained_with": {k: v for k, v in run.items() if k.endswith("_version")}}
  return write_export(out, ml_collections.ConfigDict(config_dict), run, state, source=source,
                      saved_model=saved_model, overwrite=overwrite)


def export_keras(spec: str, out: str, *, image_size: int = 299, saved_model: bool | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes an export of Keras Applications' ImageNet weights: `keras:xception` or
  `keras:inception_v3`, fetched and cached by `keras_weights`. No training run is involved.

  The export's class names are the 1,000 ImageNet classes in Keras's order (Keras's
  human-readable names; their synset ids are kept as `class_ids` in export.json). The eval
  preprocessing is this project's (central crop 0.875, bilinear resize, [-1, 1]).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top  (export side only)
  from xception_jax import convert  # pylint: disable=g-import-not-at-top
  from xception_jax import keras_weights  # pylint: disable=g-import-not-at-top
  from xception_jax import models  # pylint: disable=g-import-not-at-top

  weights = keras_weights.parse(spec, "--from")
  if not weights.include_top:
    raise ValueError(f"--from={spec}: those weights have no classifier; export the network with "
                     f"its ImageNet classifier, --from=keras:{weights.model_name}.")
  _check_out_dir(out, overwrite)  # before the download
  config = ml_collections.ConfigDict(dict(
      model_name=weights.model_name, model={}, dtype="float32", image_size=int(image_size),
      input=dict(eval_crop_fraction=0.875), dataset="imagenet2012"))
  model = models.create(weights.model_name, num_classes=keras_weights.NUM_IMAGENET_CLASSES)
  path = keras_weights.fetch(keras_weights.FILES[weights.name])
  classes = keras_weights.imagenet_classes()
  variables = convert.from_keras_h5(path, model)
  file = keras_weights.FILES[weights.name]
  run = {"num_classes": keras_weights.NUM_IMAGENET_CLASSES, "loss": "softmax",
         "multi_label": False, "class_names": list(classes.names),
         "class_ids": list(classes.synsets), "model_class": type(model).__name__}
  source = {"step": None, "weights": "keras", "keras": spec, "url": file.url, "md5": file.md5}
  return write_export(out, config, run, variables, source=source, saved_model=saved_model,
                      overwrite=overwrite)


def write_export(out: str, config, run: dict[str, Any], variables: dict[str, Any], *,
                 source: dict[str, Any], saved_model: bool | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Writes an export directory for `variables` of the model that `config` describes.

  The part of `export_run` after the checkpoint is read; also usable for weights that come from
  elsewhere (converted Keras weights, a notebook).

  Args:
    out: the export directory to create.
    config: a training config (ConfigDict): model_name, model, dtype, image_size,
      input.eval_crop_fraction, dataset.
    run: run.json's content: num_classes, loss ('softmax' | 'sigmoid'), multi_label,
      class_names (or None), image_size (defaults to config.image_size), and optionally
      class_ids (stable ids of the classes, e.g. ImageNet synsets).
    variables: {'params', 'batch_stats'} trees of arrays (other keys are ignored).
    source: where the weights come from, stored in the metadata; 'step' and 'weights'
      ('ema' | 'raw') are expected, anything else JSON-serialisable is kept as is.
    saved_model: also write a TF SavedModel. None = when TensorFlow is importable; True = required
      (error without TensorFlow); False = never.
    overwrite: replace `out` if it is an earlier export (never any other non-empty folder).
  """
  from xception_jax import train  # pylint: disable=g-import-not-at-top  (export side only)

  if paths.is_remote(out):
    _check_out_dir(out, overwrite)
    with tempfile.TemporaryDirectory() as local:
      metadata = write_export(os.path.join(local, "export"), config, run, variables,
                              source=source, saved_model=saved_model)
      _upload(os.path.join(local, "export"), paths.resolve(out))
    return metadata
  out = os.path.abspath(out)
  _check_out_dir(out, overwrite)
  if saved_model is None:
    saved_model = _tensorflow_available()
  elif saved_model and not _tensorflow_available():
    raise ValueError("A SavedModel was requested but TensorFlow (with jax.experimental.jax2tf) is "
                     "not importable here; install tensorflow-cpu or export without it.")
  num_classes = int(run["num_classes"])
  loss = run.get("loss") or ("sigmoid" if run.get("multi_label") else "softmax")
  if loss not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"run.json loss={loss!r}: valid are {sorted(OUTPUT_ACTIVATIONS)}.")
  image_size = int(run.get("image_size") or config.image_size)
  crop_fraction = float(config.input.eval_crop_fraction)
  class_names = run.get("class_names")
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"run.json lists {len(class_names)} class_names for "
                     f"num_classes={num_classes}.")

  model = train.create_model(config, num_classes)
  flat = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  expected = flatten_variables(jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy))
  _check_variables_match(config.model_name, expected, flat, source)

  infer = inference_function(model, loss)
  exported = export_function(infer, flat, image_size)

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  try:
    np.savez(os.path.join(staging, VARIABLES_FILE), **flat)
    with open(os.path.join(staging, FUNCTION_FILE), "wb") as f:
      f.write(exported.serialize())
    versions = _versions()
    saved_model_info = None
    if saved_model:
      saved_model_info = write_saved_model(os.path.join(staging, SAVED_MODEL_DIR), infer, flat,
                                           image_size, crop_fraction)
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      versions["tensorflow"] = tf.__version__
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "name": config.model_name,
            "class": run.get("model_class"),
            "settings": config.model.to_dict(),
            "dtype": config.dtype,
            "num_classes": num_classes,
            "num_params": int(sum(v.size for k, v in flat.items() if k.startswith("params/"))),
        },
        "input": {
            "shape": ["batch", image_size, image_size, 3],
            "dtype": "float32",
            "layout": "NHWC",
            "color": "RGB",
            "range": [-1.0, 1.0],
        },
        "preprocessing": {
            "description": ("decode to RGB (grey replicated, alpha dropped); central crop of "
                            "crop_fraction of each side (tf.image.central_crop's arithmetic); "
                            "bilinear resize to image_size x image_size with half-pixel centres "
                            "and no antialiasing (tf.image.resize 'bilinear'); x / 127.5 - 1"),
            "image_size": image_size,
            "crop_fraction": crop_fraction,
            "resize": {"method": "bilinear", "half_pixel_centers": True, "antialias": False},
            "scale": {"divide": 127.5, "subtract": 1.0},
            "numpy_implementation": "xception_jax.data.eval_preprocess.eval_image",
            "tensorflow_implementation": "xception_jax.data.preprocess.eval_image",
        },
        "output": {
            "keys": ["logits", "probabilities"],
            "activation": loss,
            "multi_label": bool(run.get("multi_label", loss == "sigmoid")),
            "shape": ["batch", num_classes],
        },
        "class_names": list(class_names) if class_names is not None else None,
        "class_ids": list(run["class_ids"]) if run.get("class_ids") is not None else None,
        "variables": {
            "file": VARIABLES_FILE,
            "weights": source.get("weights", "unknown"),
            "batch_norm": "unfolded",
            "naming": "'<collection>/<layer>/<leaf>', as flax.traverse_util.flatten_dict(sep='/')",
        },
        "function": {
            "file": FUNCTION_FILE,
            "format": "jax.export serialized (StableHLO)",
            "platforms": list(exported.platforms),
            "calling_convention_version": exported.calling_convention_version,
            "signature": "f(variables: dict[str, array], images: float32[b, S, S, 3]) -> "
                         "{'logits': float32[b, C], 'probabilities': float32[b, C]}",
        },
        "saved_model": saved_model_info,
        "source": {
            **source,
            "dataset": run.get("dataset", config.get("dataset")),
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
        },
        "versions": versions,
    }
    metadata["files"] = {name: {"bytes": os.path.getsize(os.path.join(staging, name)),
                                "sha256": _sha256(os.path.join(staging, name))}
                         for name in (VARIABLES_FILE, FUNCTION_FILE)}
    with open(os.path.join(staging, METADATA_FILE), "w") as f:  # last: marks the export complete
      json.dump(metadata, f, indent=2)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the export from others
    if os.path.exists(out):
      shutil.rmtree(out)  # _check_out_dir allowed it: an earlier export, or empty
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return metadata


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _upload(local: str, out: paths.Path) -> None:
  """Copies a finished local export to a cloud folder, export.json last (it marks it complete)."""
  if out.exists():
    out.rmtree()  # _check_out_dir allowed it: an earlier export, or empty
  files = sorted((os.path.relpath(os.path.join(root, name), local)
                  for root, _, names in os.walk(local) for name in names),
                 key=lambda name: name == METADATA_FILE)
  for name in files:
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.Path(os.path.join(local, name)).copy(target, overwrite=True)


def _download(export_dir: paths.Path, local: str) -> str:
  """A local copy of a cloud export folder (export.json first, so a partial export fails early)."""
  if not (export_dir / METADATA_FILE).exists():
    return os.fspath(export_dir)  # read_metadata names what is missing
  files, folders = [export_dir / METADATA_FILE], [export_dir]
  while folders:  # epath refuses '**' globs on gs://
    for path in folders.pop().iterdir():
      (folders if path.is_dir() else files).append(path)
  for path in files:
    target = os.path.join(local, os.path.relpath(os.fspath(path), os.fspath(export_dir)))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    path.copy(paths.Path(target), overwrite=True)
  return local


def _check_out_dir(out: str, overwrite: bool) -> None:
  if paths.is_remote(out):
    remote = paths.resolve(out)
    entries = [p.name for p in remote.iterdir()] if remote.is_dir() else []
    if entries and not overwrite:
      raise ValueError(f"--out={out} is not empty; pass --overwrite to replace an earlier "
                       "export, or choose another folder.")
    if entries and METADATA_FILE not in entries:
      raise ValueError(f"--out={out} is not empty and holds no {METADATA_FILE}: it does not look "
                       "like an export, so --overwrite will not delete it.")
    return
  out = os.path.abspath(out)
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise ValueError(f"--out={out} exists and is not a directory.")
  entries = os.listdir(out)
  if not entries:
    return
  if not overwrite:
    raise ValueError(f"--out={out} exists and is not empty; pass --overwrite to replace an "
                     "earlier export, or choose another folder.")
  if METADATA_FILE not in entries:
    raise ValueError(f"--out={out} is not empty and holds no {METADATA_FILE}: it does not look "
                     "like an export, so --overwrite will not delete it.")


def write_saved_model(path: str, infer: Callable, flat_variables: dict[str, np.ndarray],
                      image_size: int, crop_fraction: float) -> dict[str, Any]:
  """A TF SavedModel of `infer` (jax2tf, native serialization) with two signatures.

  `serving_default(image_bytes: string[b])` decodes and preprocesses in TF exactly as evaluation
  does (`xception_jax.data.preprocess.eval_image`) and is what TF Serving calls;
  `predict_images(images: float32[b, S, S, 3])` takes preprocessed images. Both return
  {'logits', 'probabilities'}. The weights are tf.Variables passed to the converted function
  (not constants), as the jax2tf guide recommends for large models.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from xception_jax.data import preprocess  # pylint: disable=g-import-not-at-top  (TF eval path)
  from xception_jax.data import tf_host  # pylint: disable=g-import-not-at-top

  tf_host.hide_accelerators()

  names = sorted(flat_variables)
  converted = jax2tf.convert(infer, polymorphic_shapes=[None, "(b, ...)"], with_gradient=False,
                             native_serialization_platforms=EXPORT_PLATFORMS)
  module = tf.Module()
  # A list, not a dict: '/' in dict keys would become part of the checkpoint's object paths.
  module.variables_list = [tf.Variable(flat_variables[n], trainable=False) for n in names]
  image_spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")

  @tf.function(input_signature=[image_spec], autograph=False)
  def predict_images(images):
    return converted(dict(zip(names, module.variables_list)), images)

  def decode(encoded):
    return preprocess.eval_image(encoded, image_size=image_size, crop_fraction=crop_fraction)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serving_default(image_bytes):
    images = tf.map_fn(decode, image_bytes,
                       fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))
    return predict_images(images)

  module.predict_images = predict_images
  module.serving_default = serving_default
  tf.saved_model.save(module, path, signatures={"serving_default": serving_default,
                                                "predict_images": predict_images})
  return {"dir": SAVED_MODEL_DIR,
          "signatures": {
              "serving_default": "image_bytes: string[b] (encoded JPEG/PNG/GIF/BMP) -> "
                                 "{logits, probabilities}",
              "predict_images": "images: float32[b, S, S, 3] in [-1, 1] -> "
                                "{logits, probabilities}"},
          "jax2tf": "native serialization"}


# ----------------------------------------------------------------------------------------------
# Load: export directory -> Predictor.
# ----------------------------------------------------------------------------------------------


def read_metadata(export_dir: PathLike) -> dict[str, Any]:
  """export.json of an export directory, after checking the format name and version."""
  export_dir = os.fspath(export_dir)
  if not os.path.isdir(export_dir):
    raise ExportFormatError(f"{export_dir} is not a directory: expected an export made by "
                            "`python -m xception_jax.export`.")
  path = os.path.join(export_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise ExportFormatError(
        f"{export_dir} is not a complete export: {METADATA_FILE} is missing (it is written last, "
        "so the export was interrupted or this is another kind of folder). Re-run "
        "`python -m xception_jax.export`.")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportFormatError(f"{path} is not valid JSON ({e}): the export is damaged.") from e
  found = metadata.get("format") if isinstance(metadata, dict) else None
  if found != FORMAT_NAME:
    raise ExportFormatError(f"{path} does not describe an {FORMAT_NAME} export "
                            f"(format={found!r}).")
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportFormatError(
        f"{export_dir} was written in export format version {version!r}; this version of "
        f"xception_jax reads format version {FORMAT_VERSION} only. Re-export the training run "
        f"with this version (python -m xception_jax.export), or use the xception_jax version that "
        f"wrote it ({metadata.get('versions', {}).get('xception_jax', 'unknown')}).")
  return metadata


def _check_files(export_dir: str, metadata: dict[str, Any], verify_hashes: bool) -> None:
  files = metadata.get("files") or {}
  for name in (VARIABLES_FILE, FUNCTION_FILE):
    path = os.path.join(export_dir, name)
    if not os.path.isfile(path):
      raise ExportFormatError(f"{export_dir} is incomplete: {name} is missing.")
    expected = files.get(name)
    if expected is None:
      raise ExportFormatError(f"{export_dir}/{METADATA_FILE} lists no size/hash for {name}.")
    size = os.path.getsize(path)
    if size != expected["bytes"]:
      raise ExportFormatError(f"{path} has {size} bytes but the export wrote {expected['bytes']}: "
                              "the file is truncated or was replaced. Copy or re-export it.")
    if verify_hashes and _sha256(path) != expected["sha256"]:
      raise ExportFormatError(f"{path} does not match its sha256 in {METADATA_FILE}: the file is "
                              "corrupted or was replaced. Copy or re-export it.")


def _load_variables(path: str) -> dict[str, np.ndarray]:
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ExportFormatError(f"{path} cannot be read as a numpy .npz archive ({e}).") from e


def _deserialize(path: str, metadata: dict[str, Any]) -> "jax.export.Exported":
  with open(path, "rb") as f:
    serialized = bytearray(f.read())
  try:
    return jax.export.deserialize(serialized)
  except Exception as e:  # flatbuffer / version errors have no common exception type
    raise ExportFormatError(
        f"{path} cannot be deserialized by jax {jax.__version__} ({type(e).__name__}: {e}). It was "
        f"written by jax {metadata.get('versions', {}).get('jax', 'unknown')}; jax.export "
        "artifacts load for about 6 months of jax releases: re-export with this jax.") from e


def load(export_dir: PathLike, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
         verify_hashes: bool = True) -> "Predictor":
  """Loads an export directory as a `Predictor`, checking it is complete and compatible.

  Raises:
    ExportFormatError: the folder is not an export, is incomplete (a file missing or truncated),
      corrupted, or written in another format version / by an incompatible jax.
  """
  if paths.is_remote(export_dir):  # gs://: read from a local copy
    with tempfile.TemporaryDirectory() as local:
      predictor = load(_download(paths.resolve(export_dir), local),
                       max_batch_size=max_batch_size, verify_hashes=verify_hashes)
    predictor.export_dir = os.fspath(export_dir)
    return predictor
  export_dir = os.path.abspath(os.fspath(export_dir))
  metadata = read_metadata(export_dir)
  _check_files(export_dir, metadata, verify_hashes)
  variables = _load_variables(os.path.join(export_dir, VARIABLES_FILE))
  exported = _deserialize(os.path.join(export_dir, FUNCTION_FILE), metadata)
  return Predictor(metadata, exported, variables, export_dir=export_dir,
                   max_batch_size=max_batch_size)


def _bucket(n: int, max_batch_size: int) -> int:
  """The padded size for a batch of n <= max_batch_size: the next power of two, capped."""
  return min(1 << max(n - 1, 0).bit_length(), max_batch_size)


class Predictor:
  """Runs an exported model on images: `predict(images)` -> probabilities [n, num_classes].

  Images go through exactly the eval preprocessing (`xception_jax.data.eval_preprocess`), then
  through the exported StableHLO function in batches of at most `max_batch_size`, padded to a
  power of two so that few batch shapes are ever compiled.
  """

  def __init__(self, metadata: dict[str, Any], exported: "jax.export.Exported",
               variables: dict[str, np.ndarray], *, export_dir: str = "",
               max_batch_size: int = DEFAULT_MAX_BATCH_SIZE):
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size={max_batch_size} must be >= 1.")
    self.metadata = metadata
    self.export_dir = export_dir
    self.max_batch_size = int(max_batch_size)
    try:
      self.image_size = int(metadata["preprocessing"]["image_size"])
      self.crop_fraction = float(metadata["preprocessing"]["crop_fraction"])
      self.num_classes = int(metadata["model"]["num_classes"])
      self.multi_label = bool(metadata["output"]["multi_label"])
    except (KeyError, TypeError, ValueError) as e:
      raise ExportFormatError(f"{export_dir or 'the export'}/{METADATA_FILE} lacks a valid "
                              f"{e} entry: the file was edited or damaged; re-export.") from e
    names = metadata.get("class_names")
    if names is not None and len(names) != self.num_classes:
      raise ExportFormatError(f"{export_dir or 'the export'}/{METADATA_FILE} lists {len(names)} "
                              f"class names for {self.num_classes} classes.")
    self.class_names: list[str] = (list(names) if names is not None
                                   else [str(i) for i in range(self.num_classes)])
    self._check_signature(exported, variables)
    self._exported = exported
    self._variables = jax.device_put(variables)
    self._call = jax.jit(exported.call)

  def _check_signature(self, exported, variables: dict[str, np.ndarray]) -> None:
    """The variables file must supply exactly the arguments the function was exported with."""
    where = self.export_dir or "the export"
    try:
      spec_tree = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
      expected = spec_tree[0][0]
    except Exception as e:  # pylint: disable=broad-except
      raise ExportFormatError(f"{where}: {FUNCTION_FILE} does not have the signature "
                              f"f(variables, images) of this export format ({e}).") from e
    missing = sorted(set(expected) - set(variables))
    extra = sorted(set(variables) - set(expected))
    if missing or extra:
      raise ExportFormatError(f"{where}: {VARIABLES_FILE} does not match {FUNCTION_FILE}: missing "
                              f"{missing[:5]}, unexpected {extra[:5]}.")
    for name, aval in expected.items():
      if tuple(aval.shape) != variables[name].shape or aval.dtype != variables[name].dtype:
        raise ExportFormatError(
            f"{where}: variable {name} is {variables[name].dtype}{list(variables[name].shape)} in "
            f"{VARIABLES_FILE} but the function expects {aval.dtype}{list(aval.shape)}.")
    image_aval = spec_tree[0][1]
    if tuple(image_aval.shape[1:]) != (self.image_size, self.image_size, 3):
      raise ExportFormatError(f"{where}: {FUNCTION_FILE} takes images {image_aval.shape} but "
                              f"{METADATA_FILE} says image_size={self.image_size}.")

  # --- Preprocessing.

  def preprocess(self, image: ImageInput, source: str | None = None) -> np.ndarray:
    """One image (uint8 [H, W, 3] array, path, or encoded bytes) -> float32 [S, S, 3] in [-1, 1].

    uint8 [H, W] and [H, W, 1|2|4] arrays are accepted as the eval path does (grey replicated,
    alpha dropped). Raises ImageError naming the image for anything unreadable.
    """
    if isinstance(image, (str, os.PathLike)):
      source = source or os.fspath(image)
      try:
        with open(image, "rb") as f:
          image = f.read()
      except FileNotFoundError:
        raise ImageError(source, "file not found") from None
      except OSError as e:
        raise ImageError(source, f"cannot read the file ({e.strerror or e})") from None
      if not image:
        raise ImageError(source, "the file is empty")
    source = source or "image"
    if isinstance(image, (bytes, bytearray)):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      try:
        return eval_preprocess.eval_image(bytes(image), self.image_size, self.crop_fraction)
      except Image.UnidentifiedImageError:
        raise ImageError(source, "not an image file PIL can decode (JPEG, PNG, GIF, BMP, ...)") \
            from None
      except Image.DecompressionBombError as e:
        raise ImageError(source, f"too large to decode safely ({e})") from None
      except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageError(source, f"the image data is truncated or corrupt ({e})") from None
    if isinstance(image, jax.Array):
      image = np.asarray(image)
    if not isinstance(image, np.ndarray):
      raise ImageError(source, f"expected a uint8 [H, W, 3] numpy array, a file path or encoded "
                               f"bytes, got {type(image).__name__}")
    if image.dtype != np.uint8:
      raise ImageError(source, f"dtype {image.dtype}: image arrays must be uint8 [H, W, 3] with "
                               "values 0..255 (for already preprocessed float32 batches use "
                               "Predictor.run)")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4)):
      raise ImageError(source, f"shape {image.shape}: expected [H, W, 3] (RGB), or [H, W] / "
                               "[H, W, 1] grey, [H, W, 4] RGBA; a batch must be given as a list "
                               "or a uint8 [N, H, W, 3] array")
    if 0 in image.shape[:2]:
      raise ImageError(source, f"shape {image.shape} has no pixels")
    return eval_preprocess.eval_image(image, self.image_size, self.crop_fraction)

  # --- Running the function.

  def check_batch(self, images: Any) -> np.ndarray:
    """Validates a preprocessed batch: float32 [b, S, S, 3], b >= 1. Returns it as numpy."""
    if isinstance(images, (list, tuple)):
      raise TypeError("Predictor.run takes one preprocessed float32 array [batch, S, S, 3]; "
                      "for a list of images or paths use Predictor.predict.")
    images = np.asarray(images) if isinstance(images, jax.Array) else images
    if not isinstance(images, np.ndarray):
      raise TypeError(f"Expected a numpy float32 array [batch, {self.image_size}, "
                      f"{self.image_size}, 3], got {type(images).__name__}.")
    expected = f"float32 [batch, {self.image_size}, {self.image_size}, 3] in [-1, 1]"
    if images.dtype != np.float32:
      hint = " (raw uint8 images go through Predictor.predict)" if images.dtype == np.uint8 else ""
      raise ValueError(f"images have dtype {images.dtype}; expected {expected}{hint}.")
    if images.ndim != 4:
      raise ValueError(f"images have rank {images.ndim} (shape {images.shape}); expected "
                       f"{expected}. A single image needs a leading batch axis: images[None].")
    if images.shape[-1] != 3:
      raise ValueError(f"images have {images.shape[-1]} channels (shape {images.shape}); "
                       f"expected {expected}, RGB.")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]} (shape {images.shape}); "
                       f"this model takes {expected}. Preprocess with Predictor.preprocess.")
    if images.shape[0] == 0:
      raise ValueError(f"images is an empty batch (shape {images.shape}).")
    return images

  def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Preprocessed float32 [b, S, S, 3] -> {'logits', 'probabilities'} float32 [b, classes]."""
    images = self.check_batch(images)
    results = []
    for start in range(0, images.shape[0], self.max_batch_size):
      chunk = images[start:start + self.max_batch_size]
      n = chunk.shape[0]
      padded = _bucket(n, self.max_batch_size)
      if padded > n:
        chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
      out = jax.device_get(self._call(self._variables, chunk))
      results.append({k: np.asarray(v[:n]) for k, v in out.items()})
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}

  def predict_preprocessed(self, images: np.ndarray) -> np.ndarray:
    """Preprocessed float32 [b, S, S, 3] -> probabilities float32 [b, num_classes]."""
    return self.run(images)["probabilities"]

  def predict(self, images: Sequence[ImageInput] | np.ndarray) -> np.ndarray:
    """Images -> probabilities float32 [n, num_classes] (softmax, or sigmoid if multi-label).

    Args:
      images: a list of uint8 [H, W, 3] arrays, file paths or encoded bytes (mixed freely, any
        sizes), or a uint8 [N, H, W, 3] batch.

    Raises:
      ImageError: an image cannot be read (naming it); nothing is predicted then. To predict
        the readable ones and report the others, see `xception_jax.predict.classify`.
    """
    if isinstance(images, (str, os.PathLike, bytes, bytearray)):
      raise TypeError(f"predict takes a list of images; wrap the single {type(images).__name__} "
                      "in a list: predict([image]).")
    if isinstance(images, (np.ndarray, jax.Array)):
      images = np.asarray(images)
      if images.ndim != 4:
        raise ValueError(f"An image array passed to predict must be a uint8 batch [N, H, W, 3]; "
                         f"got shape {images.shape}. Pass one image as predict([image]).")
    elif not isinstance(images, Iterable):
      raise TypeError(f"predict takes a list of images, got {type(images).__name__}.")
    images = list(images)
    if not images:
      return np.zeros((0, self.num_classes), np.float32)
    batch = np.stack([self.preprocess(image, _describe(image, i))
                      for i, image in enumerate(images)])
    return self.predict_preprocessed(batch)

  def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """[n, num_classes] probabilities -> per row, the k best {'label', 'score', 'index'}."""
    if k < 1:
      raise ValueError(f"k={k} must be >= 1.")
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :min(k, self.num_classes)]
    return [[{"label": self.class_names[j], "score": float(row[j]), "index": int(j)} for j in idx]
            for row, idx in zip(probabilities, order)]


def _describe(image: Any, index: int) -> str:
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  return f"images[{index}]"


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m xception_jax.export",
      description="Export a training run's weights and its eval-mode network for inference.")
  origin = parser.add_mutually_exclusive_group(required=True)
  origin.add_argument("--workdir", help="The training run's folder.")
  origin.add_argument("--from", dest="keras", metavar="keras:NAME",
                      help="Export Keras Applications' ImageNet weights instead of a run: "
                           "keras:xception or keras:inception_v3 (fetched and cached as Keras does).")
  parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=299,
                      help="With --from: the input size of the exported function (default 299).")
  parser.add_argument("--out", required=True, help="The export folder to create.")
  parser.add_argument("--checkpoint", default="latest",
                      help="Which checkpoint: latest (default), best (by the run's best_metric, "
                           "kept across resumes) or a step number.")
  parser.add_argument("--step", type=int, default=None, help="Same as --checkpoint=STEP.")
  parser.add_argument("--raw-weights", "--raw_weights", dest="raw_weights", action="store_true",
                      help="Export the trained weights instead of their EMA (Polyak average).")
  parser.add_argument("--saved-model", "--saved_model", dest="saved_model",
                      choices=("auto", "yes", "no"), default="auto",
                      help="Also write a TF SavedModel: auto = when TensorFlow is importable.")
  parser.add_argument("--overwrite", action="store_true",
                      help="Replace --out if it holds an earlier export.")
  args = parser.parse_args(argv)
  if args.step is not None:
    args.checkpoint = str(args.step)
  if args.checkpoint not in ("latest", "best") and not args.checkpoint.isdigit():
    parser.error(f"--checkpoint={args.checkpoint!r}: valid are latest, best or a step number.")
  if args.keras and (args.checkpoint != "latest" or args.raw_weights):
    parser.error("--checkpoint, --step and --raw-weights choose among a run's checkpoints; with "
                 "--from there is no run.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  saved_model = {"auto": None, "yes": True, "no": False}[args.saved_model]
  try:
    if args.keras:
      metadata = export_keras(args.keras, args.out, image_size=args.image_size,
                              saved_model=saved_model, overwrite=args.overwrite)
    else:
      checkpoint = int(args.checkpoint) if args.checkpoint.isdigit() else args.checkpoint
      metadata = export_run(args.workdir, args.out, step=checkpoint, use_ema=not args.raw_weights,
                            saved_model=saved_model, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  source = metadata["source"]
  origin = (f"Keras's ImageNet weights {source['keras']}" if args.keras else
            f"{metadata['variables']['weights']} weights, step {source['step']}")
  print(f"Exported {metadata['model']['name']} ({origin}) to {paths.resolve(args.out)}"
        f"{' with a TF SavedModel' if metadata['saved_model'] else ''}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
