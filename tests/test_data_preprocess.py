"""Decoding and the Inception preprocessing on awkward images, and the TF-free eval twin."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from xception_jax.data import preprocess_numpy
from xception_jax.data import preprocess_tf


def _natural_image(height, width, seed=0):
  """Smooth colour field plus noise: JPEG-like content (not flat, not white noise)."""
  rng = np.random.default_rng(seed)
  small = rng.uniform(0, 255, (height // 16 + 2, width // 16 + 2, 3)).astype(np.uint8)
  image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def _encode(array, fmt, mode="RGB"):
  buffer = io.BytesIO()
  image = Image.fromarray(array).convert(mode)
  image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
  return buffer.getvalue()


CASES = [  # (height, width, format, PIL mode)
  (60, 80, "JPEG", "RGB"),
  (50, 40, "JPEG", "L"),  # grayscale JPEG
  (48, 64, "JPEG", "CMYK"),  # CMYK JPEG
  (40, 30, "PNG", "RGB"),
  (33, 20, "PNG", "RGBA"),  # alpha dropped
  (30, 30, "PNG", "P"),  # palette
  (25, 35, "PNG", "L"),
  (3, 2, "JPEG", "RGB"),  # smaller than any crop
  (1, 1, "PNG", "RGB"),
]


@pytest.mark.parametrize("height,width,fmt,mode", CASES)
def test_every_image_becomes_rgb_of_the_model_size(height, width, fmt, mode):
  encoded = tf.constant(
    _encode(_natural_image(max(height, 16), max(width, 16))[:height, :width], fmt, mode)
  )
  train = preprocess_tf.train_image(
    encoded, tf.constant([1, 2], tf.int64), image_size=20, color_distortion=True
  )
  evaluated = preprocess_tf.eval_image(encoded, image_size=20)
  assert train.shape == (20, 20, 3) and train.dtype == tf.uint8
  assert evaluated.shape == (20, 20, 3) and evaluated.dtype == tf.float32
  assert -1.0 <= float(tf.reduce_min(evaluated)) and float(tf.reduce_max(evaluated)) <= 1.0


def test_train_pixels_are_the_rounded_float_path_and_model_input_scales_them():
  """Whole-image window, no flip: uint8 training pixels are the float resize rounded, and
  data.model_input (numpy or jitted) maps them to the eval path's [-1, 1] within rounding."""
  import jax

  from xception_jax import data

  encoded = tf.constant(_encode(_natural_image(40, 40), "PNG"))
  pixels = preprocess_tf.train_image(
    encoded,
    tf.constant([1, 2], tf.int64),
    image_size=24,
    area_range=(1.0, 1.0),
    aspect_ratio_range=(1.0, 1.0),
    flip=False,
  ).numpy()
  expected = preprocess_tf.eval_image(encoded, image_size=24, crop_fraction=1.0).numpy()
  scaled = data.model_input(pixels)
  assert scaled.dtype == np.float32
  np.testing.assert_allclose(scaled, expected, atol=0.5 / 127.5 + 1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(data.model_input)(pixels)), scaled, atol=1e-6)
  assert data.model_input(expected) is expected  # floats pass through


def test_train_augmentation_is_a_function_of_the_seed():
  encoded = tf.constant(_encode(_natural_image(60, 80), "JPEG"))
  first = preprocess_tf.train_image(encoded, tf.constant([3, 4], tf.int64), image_size=16)
  again = preprocess_tf.train_image(encoded, tf.constant([3, 4], tf.int64), image_size=16)
  other = preprocess_tf.train_image(encoded, tf.constant([3, 5], tf.int64), image_size=16)
  np.testing.assert_array_equal(first.numpy(), again.numpy())
  assert not np.array_equal(first.numpy(), other.numpy())


def test_eval_accepts_uint8_arrays_like_encoded_images():
  array = _natural_image(40, 50)
  from_array = preprocess_tf.eval_image(array, image_size=16).numpy()
  from_png = preprocess_tf.eval_image(tf.constant(_encode(array, "PNG")), image_size=16).numpy()
  np.testing.assert_allclose(from_array, from_png, atol=1e-6)
  grey = preprocess_tf.eval_image(array[..., 0], image_size=16).numpy()
  np.testing.assert_allclose(grey[..., 0], grey[..., 2])


@pytest.mark.parametrize("height,width,fmt,mode", CASES + [(375, 500, "JPEG", "RGB")])
@pytest.mark.parametrize("image_size", [299, 24])
def test_numpy_eval_preprocessing_matches_tf(height, width, fmt, mode, image_size):
  encoded = _encode(
    _natural_image(max(height, 16), max(width, 16), seed=height)[:height, :width], fmt, mode
  )
  expected = preprocess_tf.eval_image(tf.constant(encoded), image_size=image_size).numpy()
  actual = preprocess_numpy.eval_image(encoded, image_size)
  assert actual.shape == expected.shape == (image_size, image_size, 3)
  np.testing.assert_allclose(actual, expected, atol=1.0 / 255.0)


def test_central_crop_window_matches_tf():
  for height, width in [(375, 500), (1, 1), (7, 3), (299, 299), (100, 33)]:
    expected = preprocess_tf.central_crop_window(height, width, 0.875)
    assert preprocess_numpy.central_crop_window(height, width, 0.875) == tuple(
      int(v) for v in expected
    )


def test_multi_hot():
  hot = preprocess_tf.multi_hot(tf.constant([3, 0, 3], tf.int64), 5).numpy()
  np.testing.assert_array_equal(hot, [1, 0, 0, 1, 0])
  np.testing.assert_array_equal(
    preprocess_tf.multi_hot(tf.zeros([0], tf.int64), 4).numpy(), [0] * 4
  )


def test_numpy_eval_rejects_bad_arrays():
  with pytest.raises(ValueError, match="uint8"):
    preprocess_numpy.eval_image(np.zeros((4, 4, 3), np.float32), 8)
  with pytest.raises(ValueError, match=r"\[H, W\] or \[H, W, 1\|2\|3\|4\]"):
    preprocess_numpy.eval_image(np.zeros((4, 4, 5), np.uint8), 8)
