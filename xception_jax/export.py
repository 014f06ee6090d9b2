"""Export a trained run for inference: the writer of the format that `xception_jax.serving` reads.

    python -m xception_jax.export --workdir=RUN_DIR --out=EXPORT_DIR [--checkpoint=latest|best|STEP]
        [--raw_weights]
    python -m xception_jax.export --from=keras:xception --out=EXPORT_DIR   # ImageNet, no training

    from xception_jax import serving
    predictor = serving.load("EXPORT_DIR")    # the reader: numpy, PIL and jax only

The folder's layout, what each file holds and why it is built so: `xception_jax.export_format`.
This module decides what is exported (a training run's checkpoint, or Keras's ImageNet
weights) and writes the folder atomically: under a temporary name, renamed when complete.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xception_jax import checkpointing
from xception_jax import cli
from xception_jax import convert
from xception_jax import export_format
from xception_jax import keras_weights
from xception_jax import models
from xception_jax import paths
from xception_jax import saved_model as saved_model_lib
from xception_jax import serving

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
  if loss not in export_format.OUTPUT_ACTIVATIONS:
    raise ValueError(
      f"run.json loss={loss!r}: valid are {sorted(export_format.OUTPUT_ACTIVATIONS)}."
    )
  image_size = int(run.get("image_size") or config.image_size)
  crop_fraction = float(config.input.eval_crop_fraction)
  class_names = run.get("class_names")
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(
      f"run.json lists {len(class_names)} class_names for num_classes={num_classes}."
    )

  model = models.create_model(config, num_classes)
  flat = {k: np.asarray(v) for k, v in export_format.flatten_variables(variables).items()}
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  expected = export_format.flatten_variables(
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)
  )
  _check_variables_match(config.model_name, expected, flat, source)

  infer = export_format.inference_function(model, loss)
  exported = export_format.export_function(infer, flat, image_size)

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
        export_format.EXPORT_PLATFORMS,
      )
    metadata = export_format.metadata(
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
