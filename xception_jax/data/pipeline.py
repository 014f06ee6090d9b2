"""tf.data train and eval pipelines over any `Source`, and `dataset_info` for TF-backed datasets.

Train order, per process p of P (B = per-process batch, n = examples in p's shard):
  * p reads the contiguous shard [p * N // P, (p + 1) * N // P) of the train split;
  * epoch e shuffles the shard's records (buffer config.input.shuffle_buffer) with a seed that
    is a function of (config.seed, p, e) only, and numbers them e * n + i;
  * example number k is augmented with stateless random ops seeded by (config.seed, p, k);
  * step s is made of examples s * B ... s * B + B - 1 (batches run across epoch boundaries).
So the batch at step s is a function of (seed, s, p), and starting at `start_step` = s means:
start at epoch s * B // n and skip (s * B) % n still-encoded records, i.e. exactly the batches
an uninterrupted run yields from step s on. A resumed run needs no iterator state.

Eval: p reads its own contiguous shard, preprocesses it, appends mask-0 zero examples up to
num_eval_batches * B (the same count on every process) and batches without dropping anything.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow as tf

from xception_jax import data as data_lib
from xception_jax.data import preprocess
from xception_jax.data import sharding as sharding_lib
from xception_jax.data import source as source_lib
from xception_jax.data import tf_host

tf_host.hide_accelerators()  # before any TensorFlow op: the GPUs' memory is JAX's

_MAX_EPOCHS = 2 ** 40  # "forever" for tf.data.Dataset.range


def _open_source(config) -> source_lib.Source:
  if config.dataset.startswith(data_lib.IMAGEFOLDER_PREFIX):
    from xception_jax.data import imagefolder
    return imagefolder.ImageFolderSource(config)
  from xception_jax.data import tfds_source
  return tfds_source.TfdsSource(config)


_SOURCES: dict[tuple, source_lib.Source] = {}


def _source(config) -> source_lib.Source:
  """Sources are memoized per process on the fields that define them (folder scans, tfds
  metadata), so dataset_info and the iterators agree and bad-file warnings appear once."""
  key = (config.dataset, config.data_dir, config.train_split, config.eval_split,
         config.input.bad_files)
  if key not in _SOURCES:
    _SOURCES[key] = _open_source(config)
  return _SOURCES[key]


def _num_classes(config, source: source_lib.Source) -> int:
  requested = config.get("num_classes")
  if requested is None:
    return source.num_classes
  if int(requested) < source.num_classes:
    raise ValueError(
        f"config.num_classes={requested} is smaller than the {source.num_classes} classes of "
        f"{source.name!r}; set it to None (use the dataset's count) or >= {source.num_classes}.")
  return int(requested)


def dataset_info(config) -> data_lib.DatasetInfo:
  source = _source(config)
  num_classes = _num_classes(config, source)
  frequencies = source.class_frequencies
  if source.name == "embedded_shapes_multilabel":
    from xception_jax.data import embedded
    frequencies = embedded.multi_label_class_frequencies()
  if frequencies is not None and len(frequencies) < num_classes:
    frequencies = np.pad(frequencies, (0, num_classes - len(frequencies)))
  class_names = source.class_names
  if class_names is not None and len(class_names) != num_classes:
    class_names = tuple(class_names) + tuple(
        f"unused_{i}" for i in range(len(class_names), num_classes))
  return data_lib.DatasetInfo(
      name=source.name, num_classes=num_classes,
      num_train_examples=source.num_examples(source.train_split),
      num_eval_examples=source.num_examples(source.eval_split),
      multi_label=source.multi_label, class_names=class_names,
      class_frequencies=frequencies, train_split=source.train_split,
      eval_split=source.eval_split)


def _parallel(config) -> int:
  n = int(config.input.num_parallel_calls)
  return tf.data.AUTOTUNE if n == -1 else n


def _label(label: tf.Tensor, info: data_lib.DatasetInfo) -> tf.Tensor:
  if info.multi_label:
    return preprocess.multi_hot(label, info.num_classes)
  return tf.cast(tf.reshape(label, []), tf.int32)


def _stream_seed(seed: int, process_index: int, stream: int) -> int:
  """A 63-bit seed for one (config.seed, process, stream) triple; streams: 0 shuffle, 1 augment."""
  mixed = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process_index, stream]).generate_state(2)
  return int((int(mixed[0]) << 31) ^ int(mixed[1])) & ((1 << 62) - 1)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def train_dataset(config, info: data_lib.DatasetInfo, start_step: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """The per-process training tf.data.Dataset from `start_step` on (see module docstring)."""
  source = _source(config)
  batch = sharding_lib.per_process_batch_size(int(config.batch_size), process_count, "batch_size")
  split = source.train_split
  start, stop = sharding_lib.process_range(source.num_examples(split), process_index,
                                           process_count)
  shard_size = stop - start
  if shard_size < 1:
    raise ValueError(
        f"Train split {split!r} of {source.name!r} has {source.num_examples(split)} examples, "
        f"fewer than the {process_count} processes reading it.")
  records = source.records(split, start, stop)
  if config.input.cache:
    records = records.cache()
  buffer = int(min(int(config.input.shuffle_buffer), shard_size))
  shuffle_base = _stream_seed(config.seed, process_index, 0)
  augment_base = _stream_seed(config.seed, process_index, 1)

  def epoch(e):
    shuffled = records.shuffle(buffer, seed=(shuffle_base + e) % (1 << 62),
                               reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, r: (e * shard_size + i, r))

  first_example = start_step * batch
  ds = tf.data.Dataset.range(first_example // shard_size, _MAX_EPOCHS).flat_map(epoch)
  ds = ds.skip(first_example % shard_size)  # still-encoded records (paths for image folders)
  inp = config.input

  def make_example(number, record):
    record = source.load(record)
    seed = tf.stack([tf.constant(augment_base, tf.int64), number])
    image = preprocess.train_image(
        record["image"], seed, image_size=int(config.image_size),
        area_range=tuple(inp.area_range), aspect_ratio_range=tuple(inp.aspect_ratio_range),
        min_object_covered=float(inp.min_object_covered), flip=bool(inp.flip),
        color_distortion=bool(inp.color_distortion))
    return {"image": image, "label": _label(record["label"], info)}

  ds = ds.map(make_example, num_parallel_calls=_parallel(config), deterministic=True)
  ds = ds.batch(batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_iterator(config, info, start_step: int, process_index: int,
                   process_count: int) -> Iterator[dict[str, np.ndarray]]:
  ds = train_dataset(config, info, start_step, process_index, process_count)
  return iter(ds.as_numpy_iterator())


def eval_dataset(config, info: data_lib.DatasetInfo, process_index: int,
                 process_count: int) -> tuple[tf.data.Dataset, int]:
  """(per-process eval dataset, number of batches): padded and masked, nothing dropped."""
  source = _source(config)
  batch = sharding_lib.per_process_batch_size(
      data_lib.eval_batch_size(config), process_count, "eval_batch_size")
  split = source.eval_split
  total = source.num_examples(split)
  start, stop = sharding_lib.process_range(total, process_index, process_count)
  num_batches = sharding_lib.num_eval_batches(total, process_count, batch)
  records = source.records(split, start, stop)
  if config.input.cache:
    records = records.cache()
  size = int(config.image_size)

  def make_example(record):
    record = source.load(record)
    image = preprocess.eval_image(record["image"], image_size=size,
                                  crop_fraction=float(config.input.eval_crop_fraction))
    return {"image": image, "label": _label(record["label"], info),
            "mask": tf.constant(1.0, tf.float32)}

  ds = records.map(make_example, num_parallel_calls=_parallel(config), deterministic=True)
  label_shape = [info.num_classes] if info.multi_label else []
  padding = {"image": tf.zeros([size, size, 3], tf.float32),
             "label": tf.zeros(label_shape, tf.float32 if info.multi_label else tf.int32),
             "mask": tf.constant(0.0, tf.float32)}
  num_padding = num_batches * batch - (stop - start)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
  ds = ds.batch(batch, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
  return ds.with_options(_options()), num_batches


class EvalIterable:
  """Re-iterable eval batches; `len()` is the number of batches (equal on every process)."""

  def __init__(self, ds: tf.data.Dataset, num_batches: int):
    self._ds = ds
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return iter(self._ds.as_numpy_iterator())


_EVAL_DATASETS: dict[tuple, tuple[tf.data.Dataset, int]] = {}


def eval_iterable(config, info, process_index: int, process_count: int) -> EvalIterable:
  """Built once per (config, process) and re-iterated by each evaluation, so that with
  config.input.cache the encoded eval records stay in memory between evaluations."""
  key = (config.dataset, config.data_dir, config.eval_split, config.input.bad_files,
         int(config.image_size), float(config.input.eval_crop_fraction),
         data_lib.eval_batch_size(config), bool(config.input.cache),
         int(config.input.num_parallel_calls), info.num_classes, process_index, process_count)
  if key not in _EVAL_DATASETS:
    _EVAL_DATASETS[key] = eval_dataset(config, info, process_index, process_count)
  return EvalIterable(*_EVAL_DATASETS[key])
