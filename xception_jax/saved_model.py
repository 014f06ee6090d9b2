"""The TF SavedModel in an export, for TF Serving: the only part of the export that uses TensorFlow.

TensorFlow is optional: `export` writes the SavedModel when it is importable (or when asked), and
everything else in an export (variables.npz, inference.jaxexport) needs only jax. So TensorFlow
and jax2tf are imported inside `available` and `write`, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np

from xception_jax import serving


def available() -> bool:
  """Whether TensorFlow with jax.experimental.jax2tf can be imported here."""
  try:
    from jax.experimental import jax2tf  # noqa: F401  (is it importable?)
    import tensorflow  # noqa: F401
  except ImportError:
    return False
  return True


def write(
  path: str,
  infer: Callable,
  flat_variables: dict[str, np.ndarray],
  image_size: int,
  crop_fraction: float,
  platforms: Sequence[str],
) -> dict[str, Any]:
  """A TF SavedModel of `infer` (jax2tf, native serialization) with two signatures.

  `serving_default(image_bytes: string[b])` decodes and preprocesses in TF exactly as evaluation
  does (`xception_jax.data.preprocess_tf.eval_image`) and is what TF Serving calls;
  `predict_images(images: float32[b, S, S, 3])` takes preprocessed images. Both return
  {'logits', 'probabilities'}. The weights are tf.Variables passed to the converted function
  (not constants), as the jax2tf guide recommends for large models.
  """
  # TensorFlow is optional (export works without it), so it is imported here only.
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from xception_jax.data import preprocess_tf  # pylint: disable=g-import-not-at-top  (TF eval path)
  from xception_jax.data import tf_host  # pylint: disable=g-import-not-at-top

  tf_host.hide_accelerators()

  names = sorted(flat_variables)
  converted = jax2tf.convert(
    infer,
    polymorphic_shapes=[None, "(b, ...)"],
    with_gradient=False,
    native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  # A list, not a dict: '/' in dict keys would become part of the checkpoint's object paths.
  module.variables_list = [tf.Variable(flat_variables[n], trainable=False) for n in names]
  image_spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")

  @tf.function(input_signature=[image_spec], autograph=False)
  def predict_images(images):
    return converted(dict(zip(names, module.variables_list)), images)

  def decode(encoded):
    return preprocess_tf.eval_image(encoded, image_size=image_size, crop_fraction=crop_fraction)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
  def serving_default(image_bytes):
    images = tf.map_fn(
      decode,
      image_bytes,
      fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
    )
    return predict_images(images)

  module.predict_images = predict_images
  module.serving_default = serving_default
  tf.saved_model.save(
    module, path, signatures={"serving_default": serving_default, "predict_images": predict_images}
  )
  return {
    "dir": serving.SAVED_MODEL_DIR,
    "signatures": {
      "serving_default": "image_bytes: string[b] (encoded JPEG/PNG/GIF/BMP) -> "
      "{logits, probabilities}",
      "predict_images": "images: float32[b, S, S, 3] in [-1, 1] -> {logits, probabilities}",
    },
    "jax2tf": "native serialization",
  }
