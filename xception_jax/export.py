"""Export a trained run for inference: the writer of the format that `xception_jax.serving` reads.

    python -m xception_jax.export --workdir=RUN_DIR --out=EXPORT_DIR [--checkpoint=latest|best|STEP]
        [--raw_weights]
    python -m xception_jax.export --from=keras:xception --out=EXPORT_DIR   # ImageNet, no training

    from xception_jax import serving
    predictor = serving.load("EXPORT_DIR")    # the reader: numpy, PIL and jax only

An export directory is self-contained: the people who serve a model should not need this
package's model code, its configs, or the checkpoint layout of the run that trained it.

  export.json          metadata: model name and settings, input size, the exact preprocessing,
                       class names, single-/multi-label, source run, step and date, library
                       versions, the export format version, and a size + sha256 per file.
  variables.npz        the inference variables as float32 numpy arrays, one per leaf, named
                       'params/<layer>/<leaf>' and 'batch_stats/<layer>/<leaf>' as in the Flax
                       model. EMA (Polyak-averaged) weights by default, as the paper evaluates;
                       `--raw_weights` exports the trained weights instead.
  inference.jaxexport  a serialized `jax.export` (StableHLO) function
                       f(variables, images) -> {'logits', 'probabilities'} with a symbolic batch
                       dimension, lowered for cpu, cuda and tpu; `jax.export.deserialize` runs it
                       with nothing but jax installed.
  saved_model/         (when TensorFlow is importable) the same function through jax2tf's native
                       serialization, for TF Serving (`xception_jax.saved_model`).

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
    numpy/PIL when serving: `xception_jax.data.preprocess_numpy`, the twin of the TF eval path).
  * The directory is written under a temporary name and renamed when complete, so a crash never
    leaves something that looks like an export; `serving.load` also checks every file's size
    and hash.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import datetime
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from absl import flags
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xception_jax import checkpointing
from xception_jax import cli
from xception_jax import convert
from xception_jax import keras_weights
from xception_jax import models
from xception_jax import paths
from xception_jax import saved_model as saved_model_lib
from xception_jax import serving
from xception_jax import versions as versions_lib

EXPORT_PLATFORMS = ("cpu", "cuda", "tpu")
OUTPUT_ACTIVATIONS = {"softmax": jax.nn.softmax, "sigmoid": jax.nn.sigmoid}


# ----------------------------------------------------------------------------------------------
# The inference function (shared by the export and its tests).
# ----------------------------------------------------------------------------------------------


def flatten_variables(variables: dict[str, Any]) -> dict[str, Any]:
  """{'params': {...}, 'batch_stats': {...}} -> {'params/layer/leaf': leaf}, sorted by name."""
  flat = traverse_util.flatten_dict(
    {k: variables[k] for k in ("params", "batch_stats") if variables.get(k)}, sep="/"
  )
  return dict(sorted(flat.items()))


def inference_function(model, loss: str) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
  """f(flat_variables, images) -> {'logits', 'probabilities'}: the eval-mode forward pass.

  `loss` ('softmax' | 'sigmoid', as in run.json) picks the output activation.
  """
  if loss not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"loss={loss!r}: valid output activations are {sorted(OUTPUT_ACTIVATIONS)}.")
  activation = OUTPUT_ACTIVATIONS[loss]

  def infer(flat_variables: dict[str, jax.Array], images: jax.Array) -> dict[str, jax.Array]:
    variables = traverse_util.unflatten_dict(flat_variables, sep="/")
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return {"logits": logits, "probabilities": activation(logits)}

  return infer


def export_function(
  infer: Callable, flat_variables: dict[str, np.ndarray], image_size: int
) -> jax.export.Exported:
  """Lowers `infer` to StableHLO with a symbolic batch dimension 'b', for cpu, cuda and tpu."""
  (batch,) = jax.export.symbolic_shape("b")
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_variables.items()}
  return jax.export.export(jax.jit(infer), platforms=EXPORT_PLATFORMS)(variables, images)


# ----------------------------------------------------------------------------------------------
# Export: training workdir (or Keras weights) -> export directory.
# ----------------------------------------------------------------------------------------------


def read_run(workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config.json, run.json) of a training workdir, with an error naming what is missing."""
  result = []
  for name in ("config.json", "run.json"):
    path = paths.resolve(workdir) / name
    if not path.is_file():
      raise FileNotFoundError(
        f"{path} not found: --workdir must be a training run's folder (written by "
        "`python -m xception_jax.main`), holding config.json, run.json and checkpoints/."
      )
    result.append(paths.read_json(path))
  return result[0], result[1]


def _check_variables_match(
  model_name: str, expected: dict, loaded: dict, source: dict[str, Any]
) -> None:
  """The checkpoint must hold exactly the variables the configured model has."""
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  wrong = sorted(
    k for k in set(expected) & set(loaded) if tuple(expected[k].shape) != tuple(np.shape(loaded[k]))
  )
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
      f"do not match the model the config describes ({model_name}): {'; '.join(details)}."
    )


def export_run(
  workdir: str,
  out: str,
  *,
  step: int | str | None = None,
  use_ema: bool = True,
  saved_model: bool | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
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
  workdir = os.fspath(paths.resolve(workdir))
  _check_out_dir(out, overwrite)  # before the (slow) checkpoint read
  config_dict, run = read_run(workdir)
  best_metric = (
    run.get("best_metric")
    or config_dict.get("best_metric")
    or ("eval/ema_map100" if run.get("multi_label") else "eval/ema_top1")
  )
  state = checkpointing.load_variables(workdir, step, use_ema=use_ema, best_metric=best_metric)
  source = {
    "workdir": workdir,
    "step": int(state["step"]),
    "checkpoint": "latest" if step is None else str(step),
    "weights": "ema" if use_ema else "raw",
    "trained_with": {k: v for k, v in run.items() if k.endswith("_version")},
  }
  return write_export(
    out,
    ml_collections.ConfigDict(config_dict),
    run,
    state,
    source=source,
    saved_model=saved_model,
    overwrite=overwrite,
  )


def export_keras(
  spec: str,
  out: str,
  *,
  image_size: int = 299,
  saved_model: bool | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes an export of Keras Applications' ImageNet weights: `keras:xception` or
  `keras:inception_v3`, fetched and cached by `keras_weights`. No training run is involved.

  The export's class names are the 1,000 ImageNet classes in Keras's order (Keras's
  human-readable names; their synset ids are kept as `class_ids` in export.json). The eval
  preprocessing is this project's (central crop 0.875, bilinear resize, [-1, 1]).
  """
  weights = keras_weights.parse(spec, "--from")
  if not weights.include_top:
    raise ValueError(
      f"--from={spec}: those weights have no classifier; export the network with "
      f"its ImageNet classifier, --from=keras:{weights.model_name}."
    )
  _check_out_dir(out, overwrite)  # before the download
  config = ml_collections.ConfigDict(
    dict(
      model_name=weights.model_name,
      model={},
      dtype="float32",
      image_size=int(image_size),
      input=dict(eval_crop_fraction=0.875),
      dataset="imagenet2012",
    )
  )
  model = models.create(weights.model_name, num_classes=keras_weights.NUM_IMAGENET_CLASSES)
  path = keras_weights.fetch(keras_weights.FILES[weights.name])
  classes = keras_weights.imagenet_classes()
  variables = convert.from_keras_h5(path, model)
  file = keras_weights.FILES[weights.name]
  run = {
    "num_classes": keras_weights.NUM_IMAGENET_CLASSES,
    "loss": "softmax",
    "multi_label": False,
    "class_names": list(classes.names),
    "class_ids": list(classes.synsets),
    "model_class": type(model).__name__,
  }
  source = {"step": None, "weights": "keras", "keras": spec, "url": file.url, "md5": file.md5}
  return write_export(
    out, config, run, variables, source=source, saved_model=saved_model, overwrite=overwrite
  )


def write_export(
  out: str,
  config,
  run: dict[str, Any],
  variables: dict[str, Any],
  *,
  source: dict[str, Any],
  saved_model: bool | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
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
    saved_model, overwrite: as for `export_run`.
  """
  if paths.is_remote(out):
    _check_out_dir(out, overwrite)
    with tempfile.TemporaryDirectory() as local:
      metadata = write_export(
        os.path.join(local, "export"),
        config,
        run,
        variables,
        source=source,
        saved_model=saved_model,
      )
      if paths.resolve(out).exists():
        paths.resolve(out).rmtree()  # _check_out_dir allowed it: an earlier export, or empty
      paths.copy_tree(os.path.join(local, "export"), out, last=serving.METADATA_FILE)
    return metadata
  out = os.path.abspath(out)
  _check_out_dir(out, overwrite)
  if saved_model is None:
    saved_model = saved_model_lib.available()
  elif saved_model and not saved_model_lib.available():
    raise ValueError(
      "A SavedModel was requested but TensorFlow (with jax.experimental.jax2tf) is "
      "not importable here; install tensorflow-cpu or export without it."
    )
  num_classes = int(run["num_classes"])
  loss = run.get("loss") or ("sigmoid" if run.get("multi_label") else "softmax")
  if loss not in OUTPUT_ACTIVATIONS:
    raise ValueError(f"run.json loss={loss!r}: valid are {sorted(OUTPUT_ACTIVATIONS)}.")
  image_size = int(run.get("image_size") or config.image_size)
  crop_fraction = float(config.input.eval_crop_fraction)
  class_names = run.get("class_names")
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(
      f"run.json lists {len(class_names)} class_names for num_classes={num_classes}."
    )

  model = models.create_model(config, num_classes)
  flat = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  expected = flatten_variables(
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
  )
  _check_variables_match(config.model_name, expected, flat, source)

  infer = inference_function(model, loss)
  exported = export_function(infer, flat, image_size)

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  try:
    np.savez(os.path.join(staging, serving.VARIABLES_FILE), **flat)
    with open(os.path.join(staging, serving.FUNCTION_FILE), "wb") as f:
      f.write(exported.serialize())
    saved_model_info = None
    if saved_model:
      saved_model_info = saved_model_lib.write(
        os.path.join(staging, serving.SAVED_MODEL_DIR),
        infer,
        flat,
        image_size,
        crop_fraction,
        EXPORT_PLATFORMS,
      )
    metadata = _metadata(
      config,
      run,
      source,
      flat,
      exported,
      loss=loss,
      image_size=image_size,
      crop_fraction=crop_fraction,
      saved_model_info=saved_model_info,
    )
    metadata["files"] = {
      name: {
        "bytes": os.path.getsize(os.path.join(staging, name)),
        "sha256": serving.sha256(os.path.join(staging, name)),
      }
      for name in (serving.VARIABLES_FILE, serving.FUNCTION_FILE)
    }
    # export.json last: it marks the export complete.
    with open(os.path.join(staging, serving.METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=2)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would hide the export from others
    if os.path.exists(out):
      shutil.rmtree(out)  # _check_out_dir allowed it: an earlier export, or empty
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return metadata


def _metadata(
  config,
  run: dict[str, Any],
  source: dict[str, Any],
  flat: dict[str, np.ndarray],
  exported: jax.export.Exported,
  *,
  loss: str,
  image_size: int,
  crop_fraction: float,
  saved_model_info: dict[str, Any] | None,
) -> dict[str, Any]:
  """export.json's content, less the per-file sizes and hashes."""
  num_classes = int(run["num_classes"])
  class_names = run.get("class_names")
  libraries = versions_lib.EXPORT_LIBRARIES + (("tensorflow",) if saved_model_info else ())
  return {
    "format": serving.FORMAT_NAME,
    "format_version": serving.FORMAT_VERSION,
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
      "description": (
        "decode to RGB (grey replicated, alpha dropped); central crop of "
        "crop_fraction of each side (tf.image.central_crop's arithmetic); "
        "bilinear resize to image_size x image_size with half-pixel centres "
        "and no antialiasing (tf.image.resize 'bilinear'); x / 127.5 - 1"
      ),
      "image_size": image_size,
      "crop_fraction": crop_fraction,
      "resize": {"method": "bilinear", "half_pixel_centers": True, "antialias": False},
      "scale": {"divide": 127.5, "subtract": 1.0},
      "numpy_implementation": "xception_jax.data.preprocess_numpy.eval_image",
      "tensorflow_implementation": "xception_jax.data.preprocess_tf.eval_image",
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
      "file": serving.VARIABLES_FILE,
      "weights": source.get("weights", "unknown"),
      "batch_norm": "unfolded",
      "naming": "'<collection>/<layer>/<leaf>', as flax.traverse_util.flatten_dict(sep='/')",
    },
    "function": {
      "file": serving.FUNCTION_FILE,
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
      "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    },
    "versions": versions_lib.library_versions(libraries),
  }


def _check_out_dir(out: str, overwrite: bool) -> None:
  """--out may be absent, empty or (with overwrite) an earlier export; never another folder."""
  folder = paths.resolve(out)
  where = out if paths.is_remote(out) else os.fspath(folder)
  if not paths.is_remote(out) and folder.exists() and not folder.is_dir():
    raise ValueError(f"--out={where} exists and is not a directory.")
  entries = [p.name for p in folder.iterdir()] if folder.is_dir() else []
  if entries and not overwrite:
    raise ValueError(
      f"--out={where} exists and is not empty; pass --overwrite to replace an "
      "earlier export, or choose another folder."
    )
  if entries and serving.METADATA_FILE not in entries:
    raise ValueError(
      f"--out={where} is not empty and holds no {serving.METADATA_FILE}: it does "
      "not look like an export, so --overwrite will not delete it."
    )


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


PROG = "python -m xception_jax.export"
FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The training run's folder.", flag_values=FLAGS)
flags.DEFINE_string(
  "from",
  None,
  "Export Keras Applications' ImageNet weights instead of a run: "
  "keras:xception or keras:inception_v3 (fetched and cached as Keras does).",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "image_size", 299, "With --from: the input size of the exported function.", flag_values=FLAGS
)
flags.DEFINE_string("out", None, "The export folder to create.", flag_values=FLAGS)
flags.DEFINE_string(
  "checkpoint",
  "latest",
  "Which checkpoint: latest, best (by the run's "
  "best_metric, kept across resumes) or a step number.",
  flag_values=FLAGS,
)
flags.DEFINE_integer("step", None, "Same as --checkpoint=STEP.", flag_values=FLAGS)
flags.DEFINE_bool(
  "raw_weights",
  False,
  "Export the trained weights instead of their EMA (Polyak average).",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "saved_model",
  "auto",
  ["auto", "yes", "no"],
  "Also write a TF SavedModel: auto = when TensorFlow is importable.",
  flag_values=FLAGS,
)
flags.DEFINE_bool(
  "overwrite", False, "Replace --out if it holds an earlier export.", flag_values=FLAGS
)


def parse_args(argv: Sequence[str] | None) -> str | int:
  """Parses and checks the flags into FLAGS; returns the checkpoint (latest, best or a step)."""
  positional = cli.parse(FLAGS, argv, PROG, __doc__.split("\n\n")[0])
  if positional:
    cli.usage_error(PROG, f"unexpected arguments {positional}")
  if (FLAGS.workdir is None) == (FLAGS["from"].value is None):
    cli.usage_error(PROG, "give one of --workdir (a training run) or --from (Keras weights).")
  if FLAGS.out is None:
    cli.usage_error(PROG, "--out (the export folder to create) is required.")
  checkpoint = FLAGS.checkpoint if FLAGS.step is None else str(FLAGS.step)
  if checkpoint not in ("latest", "best") and not checkpoint.isdigit():
    cli.usage_error(PROG, f"--checkpoint={checkpoint!r}: valid are latest, best or a step number.")
  if FLAGS["from"].value and (checkpoint != "latest" or FLAGS.raw_weights):
    cli.usage_error(
      PROG,
      "--checkpoint, --step and --raw_weights choose among a run's "
      "checkpoints; with --from there is no run.",
    )
  return int(checkpoint) if checkpoint.isdigit() else checkpoint


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (1: the export failed, naming why)."""
  checkpoint = parse_args(argv)
  keras = FLAGS["from"].value
  saved_model = {"auto": None, "yes": True, "no": False}[FLAGS.saved_model]
  try:
    if keras:
      metadata = export_keras(
        keras,
        FLAGS.out,
        image_size=FLAGS.image_size,
        saved_model=saved_model,
        overwrite=FLAGS.overwrite,
      )
    else:
      metadata = export_run(
        FLAGS.workdir,
        FLAGS.out,
        step=checkpoint,
        use_ema=not FLAGS.raw_weights,
        saved_model=saved_model,
        overwrite=FLAGS.overwrite,
      )
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  source = metadata["source"]
  origin = (
    f"Keras's ImageNet weights {source['keras']}"
    if keras
    else f"{metadata['variables']['weights']} weights, step {source['step']}"
  )
  print(
    f"Exported {metadata['model']['name']} ({origin}) to {paths.resolve(FLAGS.out)}"
    f"{' with a TF SavedModel' if metadata['saved_model'] else ''}."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
