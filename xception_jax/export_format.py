"""What an export holds: the exported function and export.json, written by `export`, read by `serving`.

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
import datetime
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

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


def metadata(
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
