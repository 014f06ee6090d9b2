"""The Inception/Xception preprocessing in TensorFlow, one example at a time.

Train: sample a distorted bounding box (area and aspect-ratio ranges, min_object_covered,
100 attempts), decode ONLY that window of a JPEG (`tf.image.decode_and_crop_jpeg`: the entropy
decoding still reads the file but the IDCT and colour conversion of the discarded area are
skipped, which keeps the pipeline close to a plain full decode), resize bilinearly to S x S,
random horizontal flip, optional colour distortion, round to uint8. Non-JPEG images (PNG, GIF,
BMP) are decoded in full and cropped. Training images leave the host as uint8 pixels and become
[-1, 1] floats on the accelerator (`xception_jax.data.model_input`, inside the jitted step): a
quarter of the bytes to batch and transfer, and no float pass on the host; the rounding adds at
most 0.5/255 of noise to an image that random cropping and flipping already perturb far more.

Eval: full decode (ISLOW IDCT, as PIL), central crop of `crop_fraction` of each side (0.875),
resize bilinearly (half-pixel centres, no antialiasing, as TF-Slim) to S x S, scale to [-1, 1].
`preprocess_numpy.py` is a numpy/PIL twin of this path for TF-free inference.

All randomness is stateless and seeded per example (`seed`: int64 [2]) so a training batch is a
pure function of (config.seed, step, process): see `pipeline.py`.

Grayscale and CMYK JPEGs, paletted/alpha PNGs become 3-channel RGB; images smaller than the
crop are upsampled, so every output is [S, S, 3]: uint8 for training, float32 for eval.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

MAX_BOX_ATTEMPTS = 100


def _as_rgb(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W], [H, W, 1|2|3|4] -> [H, W, 3] (grey replicated, alpha dropped)."""
  if image.shape.rank == 2:
    image = image[..., None]
  channels = tf.shape(image)[-1]
  image = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def _decode_full(encoded: tf.Tensor, accurate_dct: bool = False) -> tf.Tensor:
  if accurate_dct:  # libjpeg's ISLOW IDCT, the one PIL uses: eval matches preprocess_numpy.py
    image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )
  else:
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
  return tf.ensure_shape(image, [None, None, 3])


def _decode_random_crop(encoded: tf.Tensor, seed: tf.Tensor, **box_args) -> tf.Tensor:
  """Samples an Inception crop box and decodes only that window, as uint8 [h, w, 3].

  JPEGs: the header gives the shape without decoding, then `decode_and_crop_jpeg` decodes the
  window. Other formats are decoded in full and sliced. One branch on the format, so each image
  is decoded once.
  """

  def sample_box(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.concat([shape, [3]], 0),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed,
      max_attempts=MAX_BOX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
      **box_args,
    )
    return begin, size

  def jpeg():
    begin, size = sample_box(tf.io.extract_jpeg_shape(encoded)[:2])
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = _decode_full(encoded)
    begin, size = sample_box(tf.shape(image)[:2])
    return tf.slice(image, begin, size)

  return tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bilinear, half-pixel centres, no antialiasing; float32 in [0, 255].

  The uint8 crop is cast to float32 first: TF's float32 ResizeBilinear kernel is vectorised and
  computes bit-identical values about 40% faster than its uint8 one (which converts every tap),
  the largest single saving in the training pipeline after decoding only the crop window.
  """
  resized = tf.image.resize(
    tf.cast(image, tf.float32), [image_size, image_size], method="bilinear", antialias=False
  )
  return tf.ensure_shape(resized, [image_size, image_size, 3])


def distort_color(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Inception's colour distortion on [0, 1] floats, in one of two seeded orders."""
  seeds = tf.random.experimental.stateless_split(seed, 5)

  def order_a(x):
    x = tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[0])
    x = tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[1])
    x = tf.image.stateless_random_hue(x, 0.2, seeds[2])
    return tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[3])

  def order_b(x):
    x = tf.image.stateless_random_saturation(x, 0.5, 1.5, seeds[1])
    x = tf.image.stateless_random_brightness(x, 32.0 / 255.0, seeds[0])
    x = tf.image.stateless_random_contrast(x, 0.5, 1.5, seeds[3])
    return tf.image.stateless_random_hue(x, 0.2, seeds[2])

  use_a = tf.random.stateless_uniform([], seeds[4]) < 0.5
  return tf.clip_by_value(tf.cond(use_a, lambda: order_a(image), lambda: order_b(image)), 0.0, 1.0)


def train_image(
  encoded: tf.Tensor,
  seed: tf.Tensor,
  *,
  image_size: int,
  area_range: Sequence[float] = (0.05, 1.0),
  aspect_ratio_range: Sequence[float] = (0.75, 1.33),
  min_object_covered: float = 0.1,
  flip: bool = True,
  color_distortion: bool = False,
) -> tf.Tensor:
  """Encoded image bytes -> uint8 [S, S, 3] pixels with seeded random augmentation.

  `xception_jax.data.model_input` maps them to the model's [-1, 1] (x / 127.5 - 1).
  """
  seed = tf.cast(seed, tf.int64)
  box_seed, flip_seed, color_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  image = _decode_random_crop(
    encoded,
    box_seed,
    min_object_covered=min_object_covered,
    aspect_ratio_range=tuple(aspect_ratio_range),
    area_range=tuple(area_range),
  )
  if flip:  # on the uint8 crop: 4x fewer bytes than after resizing, and flip commutes with the
    # half-pixel-centred resize (its sampling grid is mirror-symmetric)
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = _resize(image, image_size)
  if color_distortion:
    image = distort_color(image / 255.0, color_seed) * 255.0
  # Round to nearest. No clipping needed (and a saturating cast costs two more passes): bilinear
  # weights sum to 1, so values stay within [0, 255] (+ float rounding, truncated away by the
  # cast), and distort_color clips to [0, 1].
  return tf.cast(image + 0.5, tf.uint8)


def central_crop_window(height, width, crop_fraction: float):
  """(offset_y, offset_x, crop_height, crop_width) exactly as tf.image.central_crop computes it.

  start = floor((size - size * fraction) / 2) in float64, crop = size - 2 * start (so images
  smaller than one pixel of margin keep their full extent). `preprocess_numpy.py` mirrors this.
  """

  def start(size):
    size = tf.cast(size, tf.float64)
    return tf.cast((size - size * crop_fraction) / 2.0, tf.int32)

  top, left = start(height), start(width)
  return top, left, tf.cast(height, tf.int32) - 2 * top, tf.cast(width, tf.int32) - 2 * left


def eval_image(image: tf.Tensor, *, image_size: int, crop_fraction: float = 0.875) -> tf.Tensor:
  """Encoded bytes (tf.string) or a uint8 [H, W(, C)] array -> float32 [S, S, 3] in [-1, 1]."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string:
    # Full decode, then crop: decoding only the window would change the chroma upsampling at
    # its border (up to ~10/255 on a few pixels), breaking agreement with preprocess_numpy.py.
    pixels = _decode_full(image, accurate_dct=True)
    shape = tf.shape(pixels)
    top, left, height, width = central_crop_window(shape[0], shape[1], crop_fraction)
    pixels = pixels[top : top + height, left : left + width]
  else:
    if image.dtype != tf.uint8:
      raise ValueError(f"eval_image takes encoded bytes or a uint8 array, got dtype {image.dtype}.")
    pixels = _as_rgb(image)
    shape = tf.shape(pixels)
    top, left, height, width = central_crop_window(shape[0], shape[1], crop_fraction)
    pixels = pixels[top : top + height, left : left + width]
  return _resize(pixels, image_size) / 127.5 - 1.0


def multi_hot(class_ids: tf.Tensor, num_classes: int) -> tf.Tensor:
  """int [k] class ids (k may be 0) -> float32 [num_classes] with ones at the ids."""
  ids = tf.cast(tf.reshape(class_ids, [-1]), tf.int32)
  return tf.minimum(tf.reduce_sum(tf.one_hot(ids, num_classes, dtype=tf.float32), axis=0), 1.0)
