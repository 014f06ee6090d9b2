"""The eval preprocessing in numpy and PIL only: for inference without TensorFlow.

The exported model and `predict` must run where TensorFlow is not installed (the GPU image has
none), yet give the same answers as evaluation. This module reproduces `preprocess_tf.eval_image`:
decode to RGB (grey replicated, CMYK converted, alpha dropped), the same central crop window
(tf.image.central_crop's integer arithmetic), bilinear resize with half-pixel centres and no
antialiasing (TF's `tf.image.resize(..., 'bilinear', antialias=False)`, NOT PIL's resize, which
antialiases when shrinking), then x / 127.5 - 1.

Agreement with the TF path: the TF eval path decodes JPEGs with the ISLOW IDCT (PIL's default)
and in full before cropping, and the crop and resize arithmetic here is the same float32
arithmetic, so on JPEG (RGB, grey, CMYK) and PNG images the two agree to float rounding; the
tests hold them to 1/255.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ImageLike = bytes | np.ndarray | Image.Image


def to_rgb_array(image: ImageLike) -> np.ndarray:
  """Encoded bytes, a PIL image or a uint8 [H, W(, C)] array -> uint8 [H, W, 3]."""
  if isinstance(image, (bytes, bytearray)):
    image = Image.open(io.BytesIO(image))
  if isinstance(image, Image.Image):
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
      return np.repeat((np.asarray(image, np.uint32) >> 8).astype(np.uint8)[..., None], 3, -1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image array, got dtype {array.dtype}.")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or 0 in array.shape[:2]:
    raise ValueError(f"Expected an image array [H, W] or [H, W, 1|2|3|4], got {array.shape}.")
  return np.repeat(array[..., :1], 3, -1) if array.shape[-1] < 3 else array[..., :3]


def central_crop_window(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
  """(top, left, crop_height, crop_width), as tf.image.central_crop computes them."""
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
  top = int((height - height * crop_fraction) / 2.0)
  left = int((width - width * crop_fraction) / 2.0)
  return top, left, height - 2 * top, width - 2 * left


def _source_coords(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  scale = np.float32(in_size) / np.float32(out_size)
  coords = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(coords)
  lerp = (coords - floor).astype(np.float32)
  low = np.clip(floor.astype(np.int64), 0, in_size - 1)
  high = np.clip(floor.astype(np.int64) + 1, 0, in_size - 1)
  return low, high, lerp


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """uint8/float [H, W, C] -> float32 [size, size, C]; half-pixel centres, no antialiasing."""
  y0, y1, ylerp = _source_coords(image.shape[0], size)
  x0, x1, xlerp = _source_coords(image.shape[1], size)
  image = image.astype(np.float32)
  top, bottom = image[y0], image[y1]
  xl = xlerp[None, :, None]
  top = top[:, x0] + (top[:, x1] - top[:, x0]) * xl
  bottom = bottom[:, x0] + (bottom[:, x1] - bottom[:, x0]) * xl
  return top + (bottom - top) * ylerp[:, None, None]


def eval_image(image: ImageLike, image_size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """One image -> float32 [image_size, image_size, 3] in [-1, 1], like the TF eval path."""
  rgb = to_rgb_array(image)
  top, left, height, width = central_crop_window(rgb.shape[0], rgb.shape[1], crop_fraction)
  crop = rgb[top : top + height, left : left + width]
  return resize_bilinear(crop, int(image_size)) / np.float32(127.5) - np.float32(1.0)
