"""Input pipelines: one dataset string, one `DatasetInfo`, train and eval iterators.

    from xception_jax import data
    info = data.dataset_info(config)
    train_iter = data.create_train_iterator(config, info, start_step=0)
    for batch in data.create_eval_iterator(config, info): ...

`config.dataset` selects the source:
  * a tfds name (`imagenet2012`, `open_images_v4`, `cifar10`, a dataset made by
    `python -m xception_jax.data.manifest`, ...), read from `config.data_dir`;
  * `imagefolder:ROOT` for ROOT/train/CLASS/* and ROOT/val/CLASS/* (or ROOT/test/CLASS/*);
  * `embedded_shapes` / `embedded_shapes_multilabel`, procedural datasets built offline on
    first use (see `data/embedded.py`);
  * `synthetic`, random batches made on the device without TensorFlow (step-time benchmarks).

This module imports no TensorFlow: the tf.data code lives in `pipeline.py` and is imported only
when a TF-backed dataset is requested, so the model, trainer and benchmarks stay TF-free.

Determinism and resumption: the training batch at step s depends only on (config.seed, s,
process index); `create_train_iterator(config, info, start_step=s)` yields exactly the batches an
uninterrupted iterator yields at steps s, s+1, ... . A restored run therefore needs no iterator
checkpoint: pass the restored step as `start_step`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import numpy as np

SYNTHETIC = "synthetic"
EMBEDDED_DATASETS = ("embedded_shapes", "embedded_shapes_multilabel")
IMAGEFOLDER_PREFIX = "imagefolder:"
_BAD_FILES_MODES = ("skip", "error")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before building the model.

  `train_split` / `eval_split` are the resolved split names (the config may leave them empty).
  `class_frequencies` (fraction of training examples carrying each class) is provided where it
  is cheap to know, for the class-weighted MAP of multi-label evaluation; otherwise None.
  """
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  multi_label: bool
  class_names: tuple[str, ...] | None = None
  class_frequencies: np.ndarray | None = None
  train_split: str = ""
  eval_split: str = ""


def validate_input_config(config) -> None:
  """Checks the config fields the input pipeline reads; raises ValueError naming the key."""
  if not isinstance(config.dataset, str) or not config.dataset:
    raise ValueError(
        "config.dataset must be a tfds name, 'imagefolder:ROOT', one of "
        f"{list(EMBEDDED_DATASETS)} or '{SYNTHETIC}'; got {config.dataset!r}.")
  if config.dataset.startswith(IMAGEFOLDER_PREFIX) and not config.dataset[len(IMAGEFOLDER_PREFIX):]:
    raise ValueError("config.dataset='imagefolder:' needs a folder: 'imagefolder:/path/to/root'.")
  if int(config.image_size) < 1:
    raise ValueError(f"config.image_size={config.image_size} must be a positive number of pixels.")
  if config.get("num_classes") is not None and int(config.num_classes) < 1:
    raise ValueError(f"config.num_classes={config.num_classes} must be >= 1 or None.")
  inp = config.input
  if inp.bad_files not in _BAD_FILES_MODES:
    raise ValueError(f"config.input.bad_files={inp.bad_files!r}; valid: {list(_BAD_FILES_MODES)}.")
  for key, low, high in (("area_range", 0.0, 1.0), ("aspect_ratio_range", 0.0, float("inf"))):
    value = tuple(inp[key])
    if len(value) != 2 or not low < value[0] <= value[1] <= high:
      raise ValueError(
          f"config.input.{key}={value} must be (min, max) with {low} < min <= max <= {high}.")
  if not 0.0 <= float(inp.min_object_covered) <= 1.0:
    raise ValueError(f"config.input.min_object_covered={inp.min_object_covered} must be in [0, 1].")
  if not 0.0 < float(inp.eval_crop_fraction) <= 1.0:
    raise ValueError(f"config.input.eval_crop_fraction={inp.eval_crop_fraction} must be in (0, 1].")
  if int(inp.shuffle_buffer) < 1:
    raise ValueError(f"config.input.shuffle_buffer={inp.shuffle_buffer} must be >= 1.")
  if int(inp.num_parallel_calls) < 1 and int(inp.num_parallel_calls) != -1:
    raise ValueError(
        f"config.input.num_parallel_calls={inp.num_parallel_calls} must be >= 1 or -1 (AUTOTUNE).")


def dataset_info(config) -> DatasetInfo:
  """Resolves `config.dataset`, checks it is present, and describes it.

  Fails fast (before any compilation) with ValueError / FileNotFoundError saying what to download
  or prepare and where, for a missing dataset, a missing manual download, or an empty folder.
  """
  validate_input_config(config)
  if config.dataset == SYNTHETIC:
    from xception_jax.data import synthetic
    return synthetic.dataset_info(config)
  from xception_jax.data import pipeline
  return pipeline.dataset_info(config)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def create_train_iterator(config, info: DatasetInfo, start_step: int = 0, *,
                          process_index: int | None = None, process_count: int | None = None,
                          sharding: Any = None) -> Iterator[dict[str, Any]]:
  """An infinite iterator of this process's training batches, starting at `start_step`.

  Yields {'image': uint8 [B, S, S, 3] pixels, 'label': int32 [B] or float32 multi-hot
  [B, num_classes]} as numpy arrays, B = config.batch_size // process_count; `model_input` turns
  the images into the model's [-1, 1] on the accelerator. For 'synthetic' it yields GLOBAL
  jax.Arrays of config.batch_size examples instead (float32 images already in [-1, 1]), laid out
  by `sharding` (default: the batch dimension split over all devices).
  """
  validate_input_config(config)
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if config.dataset == SYNTHETIC:
    from xception_jax.data import synthetic
    return synthetic.train_iterator(config, info, start_step, sharding=sharding)
  from xception_jax.data import pipeline
  process_index, process_count = _process(process_index, process_count)
  return pipeline.train_iterator(config, info, start_step, process_index, process_count)


def model_input(images: Any) -> Any:
  """Images as the models take them: uint8 pixels -> float32 x / 127.5 - 1 in [-1, 1];
  floating-point images (eval batches, synthetic data) are returned unchanged.

  Works on numpy arrays and on jax arrays inside jit, where the training step calls it so that
  the conversion runs on the accelerator (see `preprocess.py` for why batches travel as uint8).
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images


def create_eval_iterator(config, info: DatasetInfo, *, process_index: int | None = None,
                         process_count: int | None = None) -> Iterable[dict[str, np.ndarray]]:
  """A finite iterable (fresh on each call, with len()) of this process's eval batches.

  Yields {'image', 'label', 'mask'} numpy arrays with B = eval_batch_size // process_count
  (eval_batch_size None -> batch_size). Every process yields the same number of batches; the
  tail is padded with mask-0 examples so every eval example counts exactly once overall.
  """
  validate_input_config(config)
  process_index, process_count = _process(process_index, process_count)
  if config.dataset == SYNTHETIC:
    from xception_jax.data import synthetic
    return synthetic.eval_iterable(config, info, process_index, process_count)
  from xception_jax.data import pipeline
  return pipeline.eval_iterable(config, info, process_index, process_count)


def eval_batch_size(config) -> int:
  """The global eval batch size (config.eval_batch_size, or config.batch_size when None)."""
  return int(config.eval_batch_size if config.get("eval_batch_size") is not None
             else config.batch_size)
