"""Procedural images of shapes and textures: the pixels of the embedded datasets.

Pure numpy (no TensorFlow), so the images can be rendered and inspected anywhere. Every example
is a function of (split seed, index) only: `np.random.default_rng([seed, index])` drives all its
choices, which makes the datasets bit-identical on every machine and independent of the order or
parallelism of generation.

Single-label (`SINGLE_LABEL_CLASSES`, 10 classes): full-frame patterns told apart by
orientation, periodicity, curvature and smoothness (stripes three ways, checkerboard, dots,
concentric rings, speckle, smooth clouds), a plain background, and a scene of 3-6 large shapes,
each with random colours, period, phase, position and a small rotation, on a noisy gradient
background. The class is visible in every part of the image, so Inception random crops keep
it, and colour or brightness histograms carry no label: the model must learn spatial filters.
Classes that a small Xception could not separate in a few CPU minutes were dropped (v3:
diagonal grid vs checkerboard, grid vs dots, disks vs squares vs triangles); a small Xception
reaches top-1 >= 0.9 with configs/quickstart.py.

Multi-label (`MULTI_LABEL_CLASSES`, 24 classes = 3 colour families x 8 patterns): 1-4 square
patches in distinct quadrants, each a pattern (stripes three ways, checkerboard, dots, rings,
speckle, solid) drawn in a red, green or blue hue on a grey of random brightness, on a
low-saturation background; the labels are the set of (colour, pattern) classes present, so the
model must bind a colour to a pattern. (v1 used 8 small shapes instead of patterns: a small
Xception got MAP@100 0.20 in the quickstart budget, about twice chance.)
"""

from __future__ import annotations

import colorsys

import numpy as np

IMAGE_SIZE = 72  # stored resolution; the pipeline resizes to config.image_size

SINGLE_LABEL_CLASSES = (
  "horizontal_stripes",
  "vertical_stripes",
  "diagonal_stripes",
  "checkerboard",
  "polka_dots",
  "concentric_rings",
  "speckle",
  "clouds",
  "plain",
  "shapes",
)
_TWO_COLOUR_PATTERNS = SINGLE_LABEL_CLASSES[:7]
_SCENE_SHAPES = ("circle", "square", "triangle")

MULTI_LABEL_PATTERNS = (*_TWO_COLOUR_PATTERNS, "solid")
MULTI_LABEL_COLOURS = {"red": 0.0, "green": 1.0 / 3.0, "blue": 2.0 / 3.0}  # hue centres
MULTI_LABEL_CLASSES = tuple(
  f"{colour}_{pattern}" for colour in MULTI_LABEL_COLOURS for pattern in MULTI_LABEL_PATTERNS
)
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
    return (r2 <= 1.0) & (r2 >= 0.55**2)
  if name == "hollow_square":
    m = np.maximum(au, av)
    return (m <= 0.9) & (m >= 0.6)
  if name == "bar":
    return (au <= 1.0) & (av <= 0.3)
  raise ValueError(f"Unknown shape {name!r}.")


def _pattern(name: str, u, v, rng) -> np.ndarray:
  """Boolean two-colour pattern over the frame; (u, v) are rotated pixel coordinates."""
  if name in ("horizontal_stripes", "vertical_stripes", "diagonal_stripes"):
    period = rng.uniform(6.0, 12.0)
    if name == "diagonal_stripes":  # either diagonal: a horizontal flip maps one to the other
      coord = (u + rng.choice([-1.0, 1.0]) * v) / np.sqrt(2)
    else:
      coord = v if name == "horizontal_stripes" else u
    return np.sin(2 * np.pi * coord / period + rng.uniform(0, 2 * np.pi)) > 0
  if name == "checkerboard":
    cell = rng.uniform(4.0, 8.0)
    return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
  if name == "polka_dots":  # a regular lattice of dots
    period = rng.uniform(8.0, 12.0)
    du = np.mod(u, period) - period / 2
    dv = np.mod(v, period) - period / 2
    return du * du + dv * dv <= (0.3 * period) ** 2
  if name == "concentric_rings":  # centred anywhere in (or a little outside) the frame
    period = rng.uniform(7.0, 12.0)
    cu, cv = rng.uniform(-40.0, 40.0, 2)
    return np.sin(2 * np.pi * np.hypot(u - cu, v - cv) / period) > 0
  if name == "speckle":  # random cells of 1-3 pixels
    cell = int(rng.integers(1, 4))
    cells = rng.random((u.shape[0] // cell + 1, u.shape[1] // cell + 1)) < 0.5
    return np.repeat(np.repeat(cells, cell, 0), cell, 1)[: u.shape[0], : u.shape[1]]
  raise ValueError(f"Unknown pattern {name!r}.")


def _clouds(rng, size: int) -> np.ndarray:
  """Smooth random field in [0, 1] (bilinear upsampling of a coarse random grid)."""
  coarse = int(rng.integers(3, 7))
  grid = rng.random((coarse + 1, coarse + 1))
  t = np.linspace(0, coarse, size)
  i = np.minimum(t.astype(int), coarse - 1)
  f = t - i
  rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
  field = rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]
  return (field - field.min()) / max(field.max() - field.min(), 1e-6)


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
  image = image + rng.uniform(2.0, 10.0) * rng.standard_normal(image.shape, np.float32)
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
  if name in _TWO_COLOUR_PATTERNS:
    first = _random_colour(rng, bg_colour)
    u, v = _object_coords(yy, xx, size / 2, size / 2, 1.0, rng.uniform(-np.pi / 12, np.pi / 12))
    pattern = _pattern(name, u, v, rng)
    image[pattern] = first
  elif name == "clouds":
    other = _random_colour(rng, bg_colour)
    field = _clouds(rng, size)[..., None]
    image = image * (1 - field) + other * field
  elif name == "shapes":
    for _ in range(int(rng.integers(3, 7))):
      radius = rng.uniform(0.11, 0.19) * size
      cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, 2)
      _draw_shape(
        image,
        yy,
        xx,
        _SCENE_SHAPES[int(rng.integers(3))],
        cy,
        cx,
        radius,
        rng.uniform(-np.pi / 12, np.pi / 12),
        _random_colour(rng, bg_colour),
      )
  # "plain": the gradient background alone
  return _finish(rng, image), label


def _multi_label_choice(rng) -> list[int]:
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  return sorted(int(c) for c in rng.choice(len(MULTI_LABEL_CLASSES), count, replace=False))


def render_multi_label(
  seed: int, index: int, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[int]]:
  """Example `index` of the multi-label split: (uint8 [size, size, 3], sorted class ids)."""
  rng = np.random.default_rng([seed, index])
  labels = _multi_label_choice(rng)
  bg_hsv = (rng.uniform(), rng.uniform(0.0, 0.2), rng.uniform(0.15, 0.9))
  image = _background(rng, size, np.array(colorsys.hsv_to_rgb(*bg_hsv)) * 255)
  yy, xx = _grid(size)
  cell = size / 2
  cells = rng.permutation(4)[: len(labels)]
  for label, where in zip(labels, cells):
    colour_index, pattern_index = divmod(label, len(MULTI_LABEL_PATTERNS))
    hue = list(MULTI_LABEL_COLOURS.values())[colour_index] + rng.uniform(-0.04, 0.04)
    rgb = (
      np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))) * 255
    )
    grey = rng.uniform(40, 220)
    side = int(rng.uniform(0.36, 0.48) * size)
    top = int((where // 2) * cell + rng.integers(0, int(cell) - side + 1))
    left = int((where % 2) * cell + rng.integers(0, int(cell) - side + 1))
    window = image[top : top + side, left : left + side]
    pattern_name = MULTI_LABEL_PATTERNS[pattern_index]
    if pattern_name == "solid":
      window[...] = rgb
    else:
      u, v = _object_coords(
        yy[:side, :side],
        xx[:side, :side],
        side / 2,
        side / 2,
        1.0,
        rng.uniform(-np.pi / 12, np.pi / 12),
      )
      pattern = _pattern(pattern_name, u, v, rng)
      window[...] = grey
      window[pattern] = rgb
  return _finish(rng, image), labels
