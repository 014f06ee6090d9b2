"""Loading an inference export back as a `Predictor`: the reader of `xception_jax.export`.

    from xception_jax import serving
    predictor = serving.load("EXPORT_DIR")
    probabilities = predictor.predict(["cat.jpg", uint8_hwc_array])   # float32 [2, num_classes]

The export format is defined here, by what its reader accepts (the file names, the format
version, export.json's fields: see `xception_jax.export` for what each file holds and why).
`load` checks that a folder is a complete export of this format version, every file's size and
sha256, and that the variables match the function's signature, so a damaged or foreign folder
fails with an ExportFormatError that says what is wrong instead of at the first prediction.

This module imports only numpy, PIL, jax and the numpy eval preprocessing: no Flax, no model code,
no TensorFlow, no orbax, so serving needs none of them (`python -m xception_jax.predict` runs
with those unimportable). Without this package at all:

    exported = jax.export.deserialize(bytearray(open(f"{d}/inference.jaxexport", "rb").read()))
    outputs = exported.call(dict(np.load(f"{d}/variables.npz")), preprocessed_images)
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
import hashlib
import json
import os
import tempfile
from typing import Any
import zipfile

import jax
import numpy as np
from PIL import Image

from xception_jax import paths
from xception_jax.data import preprocess_numpy

FORMAT_NAME = "xception_jax.export"
# Bump when a reader of the previous version could misread a new export (new required file,
# changed variable naming, changed function signature). Additive metadata keys do not need it.
FORMAT_VERSION = 1

METADATA_FILE = "export.json"
VARIABLES_FILE = "variables.npz"
FUNCTION_FILE = "inference.jaxexport"
SAVED_MODEL_DIR = "saved_model"

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


def sha256(path: str) -> str:
  """The hex sha256 of a file, as export.json records it for each file."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _incomplete(export_dir: str) -> ExportFormatError:
  return ExportFormatError(
    f"{export_dir} is not a complete export: {METADATA_FILE} is missing (it is written last, "
    "so the export was interrupted or this is another kind of folder). Re-run "
    "`python -m xception_jax.export`."
  )


def read_metadata(export_dir: PathLike) -> dict[str, Any]:
  """export.json of an export directory, after checking the format name and version."""
  export_dir = os.fspath(export_dir)
  if not os.path.isdir(export_dir):
    raise ExportFormatError(
      f"{export_dir} is not a directory: expected an export made by "
      "`python -m xception_jax.export`."
    )
  path = os.path.join(export_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise _incomplete(export_dir)
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportFormatError(f"{path} is not valid JSON ({e}): the export is damaged.") from e
  found = metadata.get("format") if isinstance(metadata, dict) else None
  if found != FORMAT_NAME:
    raise ExportFormatError(f"{path} does not describe an {FORMAT_NAME} export (format={found!r}).")
  version = metadata.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportFormatError(
      f"{export_dir} was written in export format version {version!r}; this version of "
      f"xception_jax reads format version {FORMAT_VERSION} only. Re-export the training run "
      f"with this version (python -m xception_jax.export), or use the xception_jax version that "
      f"wrote it ({metadata.get('versions', {}).get('xception_jax', 'unknown')})."
    )
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
      raise ExportFormatError(
        f"{path} has {size} bytes but the export wrote {expected['bytes']}: "
        "the file is truncated or was replaced. Copy or re-export it."
      )
    if verify_hashes and sha256(path) != expected["sha256"]:
      raise ExportFormatError(
        f"{path} does not match its sha256 in {METADATA_FILE}: the file is "
        "corrupted or was replaced. Copy or re-export it."
      )


def _load_variables(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise ExportFormatError(f"{path} cannot be read as a numpy .npz archive ({e}).") from e


def _deserialize(path: str, metadata: dict[str, Any]) -> jax.export.Exported:
  with open(path, "rb") as f:
    serialized = bytearray(f.read())
  try:
    return jax.export.deserialize(serialized)
  except Exception as e:  # flatbuffer / version errors have no common exception type
    raise ExportFormatError(
      f"{path} cannot be deserialized by jax {jax.__version__} ({type(e).__name__}: {e}). It was "
      f"written by jax {metadata.get('versions', {}).get('jax', 'unknown')}; jax.export "
      "artifacts load for about 6 months of jax releases: re-export with this jax."
    ) from e


def load(
  export_dir: PathLike, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, verify_hashes: bool = True
) -> Predictor:
  """Loads an export directory as a `Predictor`, checking it is complete and compatible.

  Raises:
    ExportFormatError: the folder is not an export, is incomplete (a file missing or truncated),
      corrupted, or written in another format version / by an incompatible jax.
  """
  if paths.is_remote(export_dir):  # gs://: read from a local copy
    remote = paths.resolve(export_dir)
    if not (remote / METADATA_FILE).exists():
      raise _incomplete(os.fspath(export_dir))
    with tempfile.TemporaryDirectory() as local:
      paths.copy_tree(remote, local)
      predictor = load(local, max_batch_size=max_batch_size, verify_hashes=verify_hashes)
    predictor.export_dir = os.fspath(export_dir)
    return predictor
  export_dir = os.path.abspath(os.fspath(export_dir))
  metadata = read_metadata(export_dir)
  _check_files(export_dir, metadata, verify_hashes)
  variables = _load_variables(os.path.join(export_dir, VARIABLES_FILE))
  exported = _deserialize(os.path.join(export_dir, FUNCTION_FILE), metadata)
  return Predictor(
    metadata, exported, variables, export_dir=export_dir, max_batch_size=max_batch_size
  )


def _bucket(n: int, max_batch_size: int) -> int:
  """The padded size for a batch of n <= max_batch_size: the next power of two, capped."""
  return min(1 << max(n - 1, 0).bit_length(), max_batch_size)


class Predictor:
  """Runs an exported model on images: `predict(images)` -> probabilities [n, num_classes].

  Images go through exactly the eval preprocessing (`xception_jax.data.preprocess_numpy`), then
  through the exported StableHLO function in batches of at most `max_batch_size`, padded to a
  power of two so that few batch shapes are ever compiled.
  """

  def __init__(
    self,
    metadata: dict[str, Any],
    exported: jax.export.Exported,
    variables: dict[str, np.ndarray],
    *,
    export_dir: str = "",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
  ):
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
      raise ExportFormatError(
        f"{export_dir or 'the export'}/{METADATA_FILE} lacks a valid "
        f"{e} entry: the file was edited or damaged; re-export."
      ) from e
    names = metadata.get("class_names")
    if names is not None and len(names) != self.num_classes:
      raise ExportFormatError(
        f"{export_dir or 'the export'}/{METADATA_FILE} lists {len(names)} "
        f"class names for {self.num_classes} classes."
      )
    self.class_names: list[str] = (
      list(names) if names is not None else [str(i) for i in range(self.num_classes)]
    )
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
      raise ExportFormatError(
        f"{where}: {FUNCTION_FILE} does not have the signature "
        f"f(variables, images) of this export format ({e})."
      ) from e
    missing = sorted(set(expected) - set(variables))
    extra = sorted(set(variables) - set(expected))
    if missing or extra:
      raise ExportFormatError(
        f"{where}: {VARIABLES_FILE} does not match {FUNCTION_FILE}: missing "
        f"{missing[:5]}, unexpected {extra[:5]}."
      )
    for name, aval in expected.items():
      if tuple(aval.shape) != variables[name].shape or aval.dtype != variables[name].dtype:
        raise ExportFormatError(
          f"{where}: variable {name} is {variables[name].dtype}{list(variables[name].shape)} in "
          f"{VARIABLES_FILE} but the function expects {aval.dtype}{list(aval.shape)}."
        )
    image_aval = spec_tree[0][1]
    if tuple(image_aval.shape[1:]) != (self.image_size, self.image_size, 3):
      raise ExportFormatError(
        f"{where}: {FUNCTION_FILE} takes images {image_aval.shape} but "
        f"{METADATA_FILE} says image_size={self.image_size}."
      )

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
      try:
        return preprocess_numpy.eval_image(bytes(image), self.image_size, self.crop_fraction)
      except Image.UnidentifiedImageError:
        raise ImageError(
          source, "not an image file PIL can decode (JPEG, PNG, GIF, BMP, ...)"
        ) from None
      except Image.DecompressionBombError as e:
        raise ImageError(source, f"too large to decode safely ({e})") from None
      except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageError(source, f"the image data is truncated or corrupt ({e})") from None
    if isinstance(image, jax.Array):
      image = np.asarray(image)
    if not isinstance(image, np.ndarray):
      raise ImageError(
        source,
        f"expected a uint8 [H, W, 3] numpy array, a file path or encoded "
        f"bytes, got {type(image).__name__}",
      )
    if image.dtype != np.uint8:
      raise ImageError(
        source,
        f"dtype {image.dtype}: image arrays must be uint8 [H, W, 3] with "
        "values 0..255 (for already preprocessed float32 batches use "
        "Predictor.run)",
      )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 2, 3, 4)):
      raise ImageError(
        source,
        f"shape {image.shape}: expected [H, W, 3] (RGB), or [H, W] / "
        "[H, W, 1] grey, [H, W, 4] RGBA; a batch must be given as a list "
        "or a uint8 [N, H, W, 3] array",
      )
    if 0 in image.shape[:2]:
      raise ImageError(source, f"shape {image.shape} has no pixels")
    return preprocess_numpy.eval_image(image, self.image_size, self.crop_fraction)

  # --- Running the function.

  def check_batch(self, images: Any) -> np.ndarray:
    """Validates a preprocessed batch: float32 [b, S, S, 3], b >= 1. Returns it as numpy."""
    if isinstance(images, (list, tuple)):
      raise TypeError(
        "Predictor.run takes one preprocessed float32 array [batch, S, S, 3]; "
        "for a list of images or paths use Predictor.predict."
      )
    images = np.asarray(images) if isinstance(images, jax.Array) else images
    if not isinstance(images, np.ndarray):
      raise TypeError(
        f"Expected a numpy float32 array [batch, {self.image_size}, "
        f"{self.image_size}, 3], got {type(images).__name__}."
      )
    expected = f"float32 [batch, {self.image_size}, {self.image_size}, 3] in [-1, 1]"
    if images.dtype != np.float32:
      hint = " (raw uint8 images go through Predictor.predict)" if images.dtype == np.uint8 else ""
      raise ValueError(f"images have dtype {images.dtype}; expected {expected}{hint}.")
    if images.ndim != 4:
      raise ValueError(
        f"images have rank {images.ndim} (shape {images.shape}); expected "
        f"{expected}. A single image needs a leading batch axis: images[None]."
      )
    if images.shape[-1] != 3:
      raise ValueError(
        f"images have {images.shape[-1]} channels (shape {images.shape}); expected {expected}, RGB."
      )
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(
        f"images are {images.shape[1]}x{images.shape[2]} (shape {images.shape}); "
        f"this model takes {expected}. Preprocess with Predictor.preprocess."
      )
    if images.shape[0] == 0:
      raise ValueError(f"images is an empty batch (shape {images.shape}).")
    return images

  def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Preprocessed float32 [b, S, S, 3] -> {'logits', 'probabilities'} float32 [b, classes]."""
    images = self.check_batch(images)
    results = []
    for start in range(0, images.shape[0], self.max_batch_size):
      chunk = images[start : start + self.max_batch_size]
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
      raise TypeError(
        f"predict takes a list of images; wrap the single {type(images).__name__} "
        "in a list: predict([image])."
      )
    if isinstance(images, (np.ndarray, jax.Array)):
      images = np.asarray(images)
      if images.ndim != 4:
        raise ValueError(
          f"An image array passed to predict must be a uint8 batch [N, H, W, 3]; "
          f"got shape {images.shape}. Pass one image as predict([image])."
        )
    elif not isinstance(images, Iterable):
      raise TypeError(f"predict takes a list of images, got {type(images).__name__}.")
    images = list(images)
    if not images:
      return np.zeros((0, self.num_classes), np.float32)
    batch = np.stack(
      [self.preprocess(image, _describe(image, i)) for i, image in enumerate(images)]
    )
    return self.predict_preprocessed(batch)

  def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[list[dict[str, Any]]]:
    """[n, num_classes] probabilities -> per row, the k best {'label', 'score', 'index'}."""
    if k < 1:
      raise ValueError(f"k={k} must be >= 1.")
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, : min(k, self.num_classes)]
    return [
      [{"label": self.class_names[j], "score": float(row[j]), "index": int(j)} for j in idx]
      for row, idx in zip(probabilities, order)
    ]


def _describe(image: Any, index: int) -> str:
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  return f"images[{index}]"
