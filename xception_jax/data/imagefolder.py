"""A user's own images as a `Source`: `config.dataset = 'imagefolder:ROOT'`.

Layout: ROOT/train/CLASS/*.jpg|*.png and ROOT/val/CLASS/* (or ROOT/validation/, ROOT/test/);
class ids are the sorted CLASS folder names of the train split. Files may sit in nested
sub-folders of a class folder; hidden files (".DS_Store") are ignored.

Bad files are found BEFORE training, never mid-epoch: every file is checked once (JPEG/PNG
signature, then a full decode with PIL), in parallel, and the verdict is cached per (path, size,
mtime) under `<data_dir>/imagefolder_scans/` so later runs re-check only new or changed files.
`config.input.bad_files='skip'` drops each bad file with a warning that names it and a total
count; `'error'` refuses to start, naming them. The pipeline therefore only ever sees files that
decode, and the set of examples (hence the batch at each step) is fixed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import json
import logging
import os
import warnings

import numpy as np
from PIL import Image

from xception_jax.data import source as source_lib

EVAL_SPLIT_NAMES = ("val", "validation", "test")
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
_MAX_NAMED = 20  # bad files named in an error message (all are named in warnings)


class BadImageWarning(UserWarning):
  """A file in an image folder that is not a decodable JPEG or PNG and is skipped."""


def check_image(path: str) -> str:
  """Returns '' for a decodable JPEG/PNG file, else why it is unusable."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return f"unreadable ({e.strerror})"
  if not any(data.startswith(sig) for sig in _SIGNATURES):
    return "not a JPEG or PNG image"
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.width < 1 or image.height < 1:
        return "empty image"
  except Exception as e:  # PIL raises many types for corrupt data
    return f"corrupt image ({type(e).__name__}: {e})"
  return ""


def _cache_path(root: str, data_dir: str) -> str:
  base = data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
  return os.path.join(base, "imagefolder_scans", f"{digest}.json")


def _check_all(paths: list[str], root: str, data_dir: str) -> dict[str, str]:
  """path -> problem ('' = fine), re-checking only files not in the cache or changed since."""
  cache_file = _cache_path(root, data_dir)
  try:
    with open(cache_file) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  results, todo = {}, []
  for path in paths:
    st = os.stat(path)
    key = os.path.relpath(path, root)
    entry = cache.get(key)
    if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
      results[path] = entry[2]
    else:
      todo.append((path, key, st))
  if todo:
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
      for (path, key, st), problem in zip(todo, pool.map(check_image, [t[0] for t in todo])):
        results[path] = problem
        cache[key] = [st.st_size, st.st_mtime_ns, problem]
    try:
      os.makedirs(os.path.dirname(cache_file), exist_ok=True)
      tmp = f"{cache_file}.{os.getpid()}.tmp"
      with open(tmp, "w") as f:
        json.dump(cache, f)
      os.replace(tmp, cache_file)
    except OSError as e:  # a read-only data_dir only costs re-checking next time
      logging.warning("Could not write the image-folder scan cache %s: %s", cache_file, e)
  return results


def _list_files(class_dir: str) -> list[str]:
  files = []
  for dirpath, dirnames, filenames in os.walk(class_dir):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
  return files


@functools.lru_cache(maxsize=8)
def scan(
  root: str, split: str, class_names: tuple[str, ...] | None, bad_files: str, data_dir: str
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
  """(class names, good file paths, labels) of ROOT/split, after checking every file.

  Memoized so warnings are printed once per process.
  """
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(
      f"Image folder split {split_dir!r} does not exist. Expected ROOT/train/CLASS/*.jpg and "
      f"ROOT/val/CLASS/*.jpg (or validation/ or test/) with ROOT={root!r}."
    )
  found = sorted(
    d
    for d in os.listdir(split_dir)
    if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
  )
  if class_names is None:
    class_names = tuple(found)
    if not class_names:
      raise FileNotFoundError(
        f"Image folder {split_dir!r} has no class sub-folders; put each class's images in "
        f"{split_dir}/CLASS_NAME/."
      )
  else:
    unknown = sorted(set(found) - set(class_names))
    if unknown:
      raise ValueError(
        f"Image folder {split_dir!r} has class folders {unknown} that the train split does "
        f"not have; eval classes must be among {list(class_names)}."
      )
  paths, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    if os.path.isdir(class_dir):
      files = _list_files(class_dir)
      paths += files
      labels += [label] * len(files)
  problems = _check_all(paths, root, data_dir)
  bad = [(p, problems[p]) for p in paths if problems[p]]
  if bad and bad_files == "error":
    named = "\n".join(f"  {p}: {why}" for p, why in bad[:_MAX_NAMED])
    more = f"\n  ... and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    raise ValueError(
      f"{len(bad)} bad file(s) in image folder {split_dir!r} (config.input.bad_files='error'); "
      f"remove or fix them, or set config.input.bad_files='skip':\n{named}{more}"
    )
  for path, why in bad:
    warnings.warn(f"Skipping {path}: {why}", BadImageWarning, stacklevel=2)
  if bad:
    warnings.warn(
      f"Skipped {len(bad)} bad file(s) of {len(paths)} in {split_dir!r}.",
      BadImageWarning,
      stacklevel=2,
    )
  good = [(p, l) for p, l in zip(paths, labels) if not problems[p]]
  if not good:
    raise FileNotFoundError(
      f"Image folder {split_dir!r} has no usable JPEG or PNG images in its class folders "
      f"{list(class_names)}."
    )
  empty = sorted(set(class_names) - {class_names[l] for _, l in good})
  if empty and split == "train":
    logging.warning("Image folder %s: classes with no images: %s", split_dir, empty)
  return tuple(class_names), tuple(p for p, _ in good), tuple(l for _, l in good)


def _fixed_permutation(paths, labels):
  order = np.random.default_rng(0).permutation(len(paths))
  return tuple(paths[i] for i in order), tuple(labels[i] for i in order)


class ImageFolderSource(source_lib.Source):
  """ROOT/split/CLASS/* files; records hold file paths, read after shuffling."""

  def __init__(self, config):
    root = config.dataset.split(":", 1)[1]
    if not os.path.isdir(root):
      raise FileNotFoundError(
        f"config.dataset={config.dataset!r}: folder {root!r} does not exist. Expected "
        "ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg."
      )
    train_split = config.train_split or "train"
    eval_split = config.eval_split or next(
      (s for s in EVAL_SPLIT_NAMES if os.path.isdir(os.path.join(root, s))), ""
    )
    if not eval_split:
      raise FileNotFoundError(
        f"config.dataset={config.dataset!r}: no eval split folder; create one of "
        f"{[os.path.join(root, s) for s in EVAL_SPLIT_NAMES]} with CLASS sub-folders, or set "
        "config.eval_split."
      )
    mode, data_dir = config.input.bad_files, config.data_dir
    class_names, train_paths, train_labels = scan(root, train_split, None, mode, data_dir)
    _, eval_paths, eval_labels = scan(root, eval_split, class_names, mode, data_dir)
    # Files are listed class by class; a fixed permutation (independent of config.seed) makes
    # every process's contiguous shard, and every shuffle-buffer window, a mix of all classes.
    train_paths, train_labels = _fixed_permutation(train_paths, train_labels)
    eval_paths, eval_labels = _fixed_permutation(eval_paths, eval_labels)
    super().__init__(
      name=config.dataset,
      num_classes=len(class_names),
      multi_label=False,
      class_names=class_names,
      train_split=train_split,
      eval_split=eval_split,
      split_sizes={train_split: len(train_paths), eval_split: len(eval_paths)},
    )
    self._files = {train_split: (train_paths, train_labels), eval_split: (eval_paths, eval_labels)}

  def records(self, split: str, start: int, stop: int):
    import tensorflow as tf

    paths, labels = self._files[split]
    return tf.data.Dataset.from_tensor_slices(
      {
        "image": tf.constant(list(paths[start:stop]), tf.string, shape=[stop - start]),
        "label": tf.constant(list(labels[start:stop]), tf.int64, shape=[stop - start]),
      }
    )

  def load(self, record):
    import tensorflow as tf

    return {**record, "image": tf.io.read_file(record["image"])}
