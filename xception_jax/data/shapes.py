"""Procedural images of shapes and textures: the pixels of the embedded datasets.

Pure numpy (no TensorFlow), so the images can be rendered and inspected anywhere. Every example
is a function of (split seed, index) only: `np.random.default_rng([seed, index])` drives all its
choices, which makes the datasets bit-identical on every machine and independent of the order or
parallelism of generation.

Single-label (`SINGLE_LABEL_CLASSES`, 10 classes): a scene of 6-12 small shapes of ONE kind
(circles, squares, ...) with random colours, sizes, positions and rotations, or a full-frame
texture (stripes, checkerboard, grid), on a noisy gradient background. The class is visible in
every part of the image, so the Inception random crop (down to 5% of the area) keeps it: a tiny
Xception learns it in a few CPU minutes, yet it needs spatial filters (colour and brightness
histograms carry no label).

Multi-label (`MULTI_LABEL_CLASSES`, 24 classes = 8 shapes x 3 colour families): 1-4 small
objects, each a distinct (colour, shape) class, on a low-saturation background; the labels are
the set of classes present.
"""
from __future__ import annotations

import colorsys

import numpy as np

IMAGE_SIZE = 72  # stored resolution; the pipeline resizes to config.image_size

SINGLE_LABEL_CLASSES = (
    "circles", "squares", "triangles", "crosses", "rings", "hollow_squares",
    "horizontal_stripes", "vertical_stripes", "checkerboard", "grid")
_TEXTURES = ("horizontal_stripes", "vertical_stripes", "checkerboard", "grid")

MULTI_LABEL_SHAPES = ("circle", "square", "triangle", "cross", "ring", "hollow_square",
                      "diamond", "bar")
MULTI_LABEL_COLOURS = {"red": 0.0, "green": 1.0 / 3.0, "blue": 2.0 / 3.0}  # hue centres
MULTI_LABEL_CLASSES = tuple(f"{colour}_{shape}" for colour in MULTI_LABEL_COLOURS
                            for shape in MULTI_LABEL_SHAPES)
MAX_OBJECTS = 4


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  return yy, xx


def _object_coords(yy, xx, cy, cx, radius, angle):
  """Pixel grid in the object's frame: (u, v) in [-1, 1] over its bounding square."""
  c, s = np.cos(angle), np.sin(angle)
  dx, dy = xx - cx, yy - cy
  return (dx * c + dy * s) / radius, (-dx * s + dy * c) / radius


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  au, av = np.abs(u), np.abs(v)
  if name == "circle":
    return u * u + v * v <= 1.0
  if name == "square":
    return np.maximum(au, av) <= 0.85
  if name == "diamond":
    return au + av <= 1.0
  if name == "triangle":  # apex up (image y grows downwards)
    return (v <= 0.75) & (au <= (v + 1.0) * 0.55)
  if name == "cross":
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  if name == "ring":
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
  if name == "hollow_square":
    m = np.maximum(au, av)
    return (m <= 0.9) & (m >= 0.6)
  if name == "bar":
    return (au <= 1.0) & (av <= 0.3)
  raise ValueError(f"Unknown shape {name!r}.")


def _texture(name: str, u, v, radius, rng) -> np.ndarray:
  """Boolean pattern (True = first colour) inside a patch; periods in pixels."""
  pu, pv = u * radius, v * radius
  if name in ("horizontal_stripes", "vertical_stripes"):
    period = rng.uniform(6.0, 12.0)
    coord = pv if name == "horizontal_stripes" else pu
    return np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi)) > 0
  if name == "checkerboard":
    cell = rng.uniform(4.0, 8.0)
    return (np.floor(pu / cell) + np.floor(pv / cell)) % 2 == 0
  if name == "grid":  # thin lines both ways
    period = rng.uniform(7.0, 12.0)
    width = rng.uniform(1.5, 2.5)
    return (np.mod(pu, period) < width) | (np.mod(pv, period) < width)
  raise ValueError(f"Unknown texture {name!r}.")


def _random_colour(rng, away_from=None, min_distance: float = 110.0) -> np.ndarray:
  """A random RGB colour at least `min_distance` (Euclidean, 0-255) from `away_from`."""
  while True:
    colour = rng.uniform(0, 255, 3)
    if away_from is None or np.linalg.norm(colour - away_from) >= min_distance:
      return colour


def _background(rng, size: int, colour: np.ndarray) -> np.ndarray:
  """A flat colour plus a random linear gradient (texture-free, so it carries no label)."""
  yy, xx = _grid(size)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5
  amplitude = rng.uniform(-40, 40, 3)
  return colour[None, None, :] + ramp[..., None] * amplitude[None, None, :]


def _finish(rng, image: np.ndarray) -> np.ndarray:
  image = image + rng.normal(0.0, rng.uniform(2.0, 10.0), image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _draw_shape(image, yy, xx, name, cy, cx, radius, angle, colour) -> None:
  """Rasterizes one shape in place, only within its bounding window."""
  size = image.shape[0]
  y0, x0 = max(0, int(cy - 1.5 * radius)), max(0, int(cx - 1.5 * radius))
  y1, x1 = min(size, int(cy + 1.5 * radius) + 2), min(size, int(cx + 1.5 * radius) + 2)
  if y0 >= y1 or x0 >= x1:
    return
  u, v = _object_coords(yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], cy, cx, radius, angle)
  image[y0:y1, x0:x1][_shape_mask(name, u, v)] = colour


def render_single_label(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
  """Example `index` of the single-label split with `seed`: (uint8 [size, size, 3], label)."""
  rng = np.random.default_rng([seed, index])
  label = int(rng.integers(len(SINGLE_LABEL_CLASSES)))
  name = SINGLE_LABEL_CLASSES[label]
  bg_colour = _random_colour(rng)
  image = _background(rng, size, bg_colour)
  yy, xx = _grid(size)
  if name in _TEXTURES:
    first = _random_colour(rng, bg_colour)
    second = _random_colour(rng, first)
    u, v = _object_coords(yy, xx, size / 2, size / 2, 1.0, rng.uniform(-np.pi / 12, np.pi / 12))
    pattern = _texture(name, u, v, 1.0, rng)
    image[pattern] = first
    if name != "grid":  # the grid's gaps show the background
      image[~pattern] = second
  else:
    shape = name[:-1] if name != "crosses" else "cross"  # circles -> circle
    for _ in range(int(rng.integers(6, 13))):
      radius = rng.uniform(0.07, 0.13) * size
      cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, 2)
      _draw_shape(image, yy, xx, shape, cy, cx, radius, rng.uniform(-np.pi / 12, np.pi / 12),
                  _random_colour(rng, bg_colour))
  return _finish(rng, image), label


def _multi_label_choice(rng) -> list[int]:
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  return sorted(int(c) for c in rng.choice(len(MULTI_LABEL_CLASSES), count, replace=False))


def multi_label_labels(seed: int, index: int) -> list[int]:
  """The labels of example `index` without rendering it (same rng stream as the renderer)."""
  return _multi_label_choice(np.random.default_rng([seed, index]))


def render_multi_label(seed: int, index: int, size: int = IMAGE_SIZE
                       ) -> tuple[np.ndarray, list[int]]:
  """Example `index` of the multi-label split: (uint8 [size, size, 3], sorted class ids)."""
  rng = np.random.default_rng([seed, index])
  labels = _multi_label_choice(rng)
  bg_hsv = (rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.15, 0.9))
  image = _background(rng, size, np.array(colorsys.hsv_to_rgb(*bg_hsv)) * 255)
  yy, xx = _grid(size)
  cell = size / 2
  cells = rng.permutation(4)[:len(labels)]
  for label, where in zip(labels, cells):
    colour_name, shape = divmod(label, len(MULTI_LABEL_SHAPES))
    hue = list(MULTI_LABEL_COLOURS.values())[colour_name] + rng.uniform(-0.04, 0.04)
    rgb = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.65, 1.0),
                                       rng.uniform(0.6, 1.0))) * 255
    radius = rng.uniform(0.13, 0.21) * size
    jitter = max(0.0, cell / 2 - radius)
    cy = (where // 2 + 0.5) * cell + rng.uniform(-jitter, jitter)
    cx = (where % 2 + 0.5) * cell + rng.uniform(-jitter, jitter)
    _draw_shape(image, yy, xx, MULTI_LABEL_SHAPES[shape], cy, cx, radius,
                rng.uniform(-np.pi / 12, np.pi / 12), rgb)
  return _finish(rng, image), labels
