"""The files Keras Applications publishes (ImageNet weights, class index): fetch, verify, cache.

    --config.init_from=keras:xception            # or keras:xception_notop, keras:inception_v3[_notop]
    python -m xception_jax.export --from=keras:xception --out=DIR

Each name maps to the URL Keras downloads from and the md5 hash Keras checks
(keras/src/applications/xception.py, inception_v3.py and imagenet_utils.py; `FILES` below, and
tests/test_keras_weights.py compares the table with the installed keras's source). Files are
cached where Keras caches them, `$KERAS_HOME/models/` or `~/.keras/models/` (`/tmp/.keras` when
the home folder is not writable, as Keras does), under Keras's file names, so a file that a Keras
user already downloaded is found and not fetched again. Every file, cached or downloaded, is
checked against its md5 before it is used; a cached file with another hash is fetched again (as
Keras does), a download with another hash is deleted and refused. When the download fails
(offline, proxy, server error) or the hash is wrong, `KerasFileError` names the URL and the exact
path where a copy of the file can be placed by hand.

The 1,000 ImageNet classes come in Keras's class order (the index of the logits): the synset ids
are read from the `labels.txt` that tensorflow-datasets ships for imagenet2012 (sorted, which is
also Keras's order) and the human-readable names from Keras's `imagenet_class_index.json`
(index -> [synset, name]), fetched and cached like the weights; `imagenet_classes` checks that
the two lists agree entry by entry. No names file is shipped in this repository: nothing installed
here holds Keras's names, and they are not ours to retype.

Mirrors and tests: `FILES` maps each name to a `KerasFile`; replacing an entry (e.g.
`monkeypatch.setitem(keras_weights.FILES, "xception", KerasFile(name, "http://127.0.0.1:8000/x.h5",
md5_of_that_file))`) points the fetch at another server, and `fetch(file, directory)` takes any
`KerasFile` and cache folder. The hash check is never skipped.

Imports neither TensorFlow nor Keras (urllib, hashlib and json only).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request

PREFIX = "keras:"
_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
CLASS_INDEX = "imagenet_class_index"
NUM_IMAGENET_CLASSES = 1000


class KerasFileError(FileNotFoundError):
  """A Keras file that could not be fetched or failed its hash check; says where to put it."""


@dataclasses.dataclass(frozen=True)
class KerasFile:
  """One published file: Keras's file name in its cache, its URL and its md5 (as Keras checks)."""
  filename: str
  url: str
  md5: str


@dataclasses.dataclass(frozen=True)
class KerasWeights:
  """What `keras:NAME` means: the file and the network (our registry name) it holds weights for."""
  name: str
  model_name: str
  include_top: bool


FILES: dict[str, KerasFile] = {
    "xception": KerasFile(
        "xception_weights_tf_dim_ordering_tf_kernels.h5",
        _APPLICATIONS_URL + "xception/xception_weights_tf_dim_ordering_tf_kernels.h5",
        "0a58e3b7378bc2990ea3b43d5981f1f6"),
    "xception_notop": KerasFile(
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _APPLICATIONS_URL + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b0042744bf5b25fce3cb969f33bebb97"),
    "inception_v3": KerasFile(
        "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
        _APPLICATIONS_URL + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
        "9a0d58056eeedaa3f26cb7ebd46da564"),
    "inception_v3_notop": KerasFile(
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _APPLICATIONS_URL + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "bcbd6486424b2319ff4ef7d526e38f63"),
    CLASS_INDEX: KerasFile(
        "imagenet_class_index.json",
        "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
        "c2c37ea517e94d9795004a39431a14cb"),
}

WEIGHTS: dict[str, KerasWeights] = {
    "xception": KerasWeights("xception", "xception", include_top=True),
    "xception_notop": KerasWeights("xception_notop", "xception", include_top=False),
    "inception_v3": KerasWeights("inception_v3", "inception_v3", include_top=True),
    "inception_v3_notop": KerasWeights("inception_v3_notop", "inception_v3", include_top=False),
}


# --- Names ---------------------------------------------------------------------------------------


def is_keras_spec(value: str) -> bool:
  return isinstance(value, str) and value.startswith(PREFIX)


def parse(spec: str, what: str = "init_from") -> KerasWeights:
  """'keras:xception' -> its KerasWeights; an unknown name is a ValueError listing the valid ones."""
  name = spec[len(PREFIX):] if is_keras_spec(spec) else spec
  if name not in WEIGHTS:
    raise ValueError(f"{what}={spec!r}: Keras Applications weights are "
                     f"{', '.join(PREFIX + n for n in WEIGHTS)}.")
  return WEIGHTS[name]


def check_model(spec: str, model_name: str, what: str = "config.init_from") -> KerasWeights:
  """The weights of `spec` must be for `model_name` (Keras publishes only the full networks)."""
  weights = parse(spec, what)
  if model_name != weights.model_name:
    raise ValueError(
        f"{what}={spec!r} holds weights for model_name={weights.model_name!r} (Keras "
        f"Applications' full network), but config.model_name={model_name!r}. Set "
        f"config.model_name={weights.model_name!r}, or start from scratch (init_from='').")
  return weights


# --- Cache and fetch -----------------------------------------------------------------------------


def keras_home() -> str:
  """Keras's base folder: $KERAS_HOME, else ~/.keras (/tmp/.keras if ~ is not writable)."""
  if "KERAS_HOME" in os.environ:
    return os.path.expanduser(os.environ["KERAS_HOME"])
  base = os.path.expanduser("~")
  if not os.access(base, os.W_OK):
    base = "/tmp"
  return os.path.join(base, ".keras")


def cache_dir() -> str:
  """Where Keras caches application weights: keras_home()/models (or /tmp/.keras/models)."""
  base = keras_home()
  if os.path.isdir(base) and not os.access(base, os.W_OK):  # keras.utils.get_file's fallback
    base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
  return os.path.join(base, "models")


def md5sum(path: str) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _by_hand(file: KerasFile, path: str) -> str:
  return (f"Download {file.url} on a machine with network access (e.g. `curl -o FILE URL`) and "
          f"place it at {path} (md5 {file.md5}).")


def fetch(file: KerasFile, directory: str | None = None, *, timeout: float = 60.0) -> str:
  """The local path of `file`: from the cache if its hash is right, else downloaded and checked.

  Args:
    file: what to fetch (an entry of FILES, or a mirror's / test server's KerasFile).
    directory: the cache folder; default `cache_dir()` (Keras's).
    timeout: seconds without an answer from the server before the download fails.

  Raises:
    KerasFileError: the file is not cached and cannot be downloaded, or the download has another
      hash; the message names the URL and the path to place the file at by hand.
  """
  directory = directory or cache_dir()
  path = os.path.join(directory, file.filename)
  stale = ""
  if os.path.isfile(path):
    found = md5sum(path)
    if found == file.md5:
      return path
    stale = f" The cached {path} has md5 {found}, not {file.md5}, so it was not used."
    logging.warning("%s has md5 %s, expected %s: downloading it again from %s.", path, found,
                    file.md5, file.url)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise KerasFileError(f"Cannot create the Keras cache folder {directory} ({e}). Set "
                         "KERAS_HOME to a writable folder.") from e
  logging.info("Downloading %s to %s.", file.url, path)
  handle, partial = tempfile.mkstemp(prefix=f".{file.filename}.", suffix=".part", dir=directory)
  try:
    digest = hashlib.md5()
    with os.fdopen(handle, "wb") as out, urllib.request.urlopen(file.url, timeout=timeout) as r:
      for block in iter(lambda: r.read(1 << 20), b""):
        digest.update(block)
        out.write(block)
    if digest.hexdigest() != file.md5:
      raise KerasFileError(
          f"The file downloaded from {file.url} has md5 {digest.hexdigest()}, but Keras publishes "
          f"it with md5 {file.md5}: it was deleted, not used (a proxy's error page, a truncated "
          f"transfer or a changed file).{stale} {_by_hand(file, path)}")
    os.replace(partial, path)
  except (urllib.error.URLError, OSError, ValueError) as e:
    if isinstance(e, KerasFileError):
      raise
    reason = getattr(e, "reason", None) or e
    raise KerasFileError(f"Cannot download {file.url} ({reason}); no network?{stale} "
                         f"{_by_hand(file, path)}") from e
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path


def fetch_weights(spec: str, directory: str | None = None) -> tuple[KerasWeights, str]:
  """'keras:xception' -> (what it is, the local path of its checked .h5 file)."""
  weights = parse(spec)
  return weights, fetch(FILES[weights.name], directory)


# --- ImageNet classes ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImagenetClasses:
  """The 1,000 classes in Keras's order: `synsets[i]` and `names[i]` describe logit i."""
  synsets: tuple[str, ...]
  names: tuple[str, ...]


def tfds_imagenet_synsets() -> tuple[str, ...] | None:
  """The synsets of tensorflow-datasets' imagenet2012 builder (labels.txt), None without tfds.

  Read from the installed package's folder, without importing tensorflow_datasets (which would
  import TensorFlow).
  """
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.submodule_search_locations:
    return None
  root = list(spec.submodule_search_locations)[0]
  for relative in ("datasets/imagenet2012/labels.txt",  # tfds >= 4.9
                   "image_classification/imagenet2012_labels.txt"):  # older layout
    path = os.path.join(root, relative)
    if os.path.isfile(path):
      with open(path) as f:
        return tuple(line.strip() for line in f if line.strip())
  return None


def parse_class_index(index: dict[str, list[str]], source: str = "the class index",
                      synsets: tuple[str, ...] | None = None) -> ImagenetClasses:
  """Keras's {"0": [synset, name], ...} -> ImagenetClasses in index order (0, 1, ..., 999).

  `synsets` (default: tfds's labels.txt, if installed) must agree with the index entry by entry.
  """
  expected_keys = {str(i) for i in range(NUM_IMAGENET_CLASSES)}
  if not isinstance(index, dict) or set(index) != expected_keys:
    raise ValueError(f"{source} must map the keys '0'..'{NUM_IMAGENET_CLASSES - 1}' to "
                     "[synset, name]; it does not.")
  entries = [index[str(i)] for i in range(NUM_IMAGENET_CLASSES)]  # numeric order, not "10" < "2"
  if any(not isinstance(e, list) or len(e) != 2 for e in entries):
    raise ValueError(f"{source}: every entry must be [synset, name].")
  classes = ImagenetClasses(tuple(e[0] for e in entries), tuple(e[1] for e in entries))
  synsets = tfds_imagenet_synsets() if synsets is None else synsets
  if synsets is not None and tuple(synsets) != classes.synsets:
    first = next((i for i, (a, b) in enumerate(zip(synsets, classes.synsets)) if a != b),
                 min(len(synsets), len(classes.synsets)))
    raise ValueError(
        f"{source} and tensorflow-datasets' imagenet2012 labels.txt disagree on the class order "
        f"(first at index {first}: {classes.synsets[first] if first < len(classes.synsets) else None}"
        f" vs {synsets[first] if first < len(synsets) else None}).")
  return classes


def imagenet_classes(directory: str | None = None) -> ImagenetClasses:
  """Keras's 1,000 ImageNet classes (synset ids and names), fetched and cached like the weights."""
  path = fetch(FILES[CLASS_INDEX], directory)
  with open(path) as f:
    return parse_class_index(json.load(f), source=path)

