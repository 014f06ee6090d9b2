"""tfds datasets as `Source`s: ImageNet, Open Images, any image-classification dataset, the
embedded datasets and datasets made from manifests by `python -m xception_jax.data.manifest`.

Nothing is downloaded here (training machines may have no network): a dataset that is not
prepared in `config.data_dir` is refused up front with the exact command or files needed. The
embedded datasets are the exception: they are generated locally on first use.

Labels: a `ClassLabel` feature is single-label; a `Sequence(ClassLabel)` is multi-label (class
ids, turned into multi-hot vectors by the pipeline). `open_images_v4` keeps, from its image-level
'objects', the labels verified positive (confidence 1, stored by tfds as 10).
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from xception_jax.data import source as source_lib

# tfds names whose label is not a plain supervised key: name -> (image key, label getter).
OPEN_IMAGES = "open_images_v4"
OPEN_IMAGES_POSITIVE_CONFIDENCE = 10  # tfds stores confidence * 10 (0, 1, ..., 10)

_MANUAL_FILES = {
  "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}


def _default_data_dir(data_dir: str) -> str:
  return data_dir or os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _not_prepared_message(builder, name: str, data_dir: str) -> str:
  """Says exactly what is missing and the command that prepares it."""
  data_dir = _default_data_dir(data_dir)
  build = f"tfds build {name} --data_dir={data_dir}"
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if instructions:
    manual_dir = os.path.join(data_dir, "downloads", "manual")
    files = _MANUAL_FILES.get(name.split("/")[0].split(":")[0], ())
    missing = [f for f in files if not os.path.exists(os.path.join(manual_dir, f))]
    if missing or not files:
      what = (
        f"put {', '.join(missing)} in {manual_dir}"
        if files
        else f"put the files described below in {manual_dir}"
      )
      return (
        f"config.dataset={name!r} is not prepared in config.data_dir={data_dir!r} and needs "
        f"a manual download: {what}, then run `{build}` once (it converts the archives; "
        f"ImageNet takes hours). tfds instructions:\n{instructions.strip()}"
      )
    return (
      f"config.dataset={name!r}: the manual download is in {manual_dir} but the dataset is "
      f"not prepared in {data_dir!r}; run `{build}` once before training."
    )
  return (
    f"config.dataset={name!r} is not prepared in config.data_dir={data_dir!r}. Prepare it "
    f"with `{build}` on a machine with network access (or copy a prepared "
    f"{os.path.join(data_dir, name.split(':')[0])} folder there). For your own images use "
    "'imagefolder:ROOT' or `python -m xception_jax.data.manifest`."
  )


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  if name in source_lib.EMBEDDED_DATASETS:
    from xception_jax.data import embedded

    return embedded.prepare(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"config.dataset={name!r} is not a tfds dataset (registered or prepared in "
      f"config.data_dir={_default_data_dir(data_dir)!r}). Valid: a tfds name such as "
      f"'imagenet2012', 'imagefolder:ROOT', {list(source_lib.EMBEDDED_DATASETS)} or "
      f"'{source_lib.SYNTHETIC}'."
    ) from e
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(builder, name, data_dir))
  return builder


def _label_spec(name: str, builder) -> tuple[str, str, Any]:
  """(image key, label key, ClassLabel feature) and validates the feature types."""
  features = builder.info.features
  if name.split(":")[0].split("/")[0] == OPEN_IMAGES:
    return "image", "objects", features["objects"]["label"]
  keys = builder.info.supervised_keys
  if keys and isinstance(keys[0], str) and isinstance(keys[1], str):
    image_key, label_key = keys
  else:
    image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k in ("label", "labels") if k in features), None)
  if (
    image_key is None
    or label_key is None
    or not isinstance(features[image_key], tfds.features.Image)
  ):
    raise ValueError(
      f"config.dataset={name!r} has no (Image, ClassLabel) pair to classify: features "
      f"{sorted(features.keys())}. Use an image-classification dataset."
    )
  label = features[label_key]
  if isinstance(label, tfds.features.Sequence):
    label = label.feature
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(
      f"config.dataset={name!r}: feature {label_key!r} is {type(label).__name__}, expected a "
      "ClassLabel (single-label) or Sequence(ClassLabel) (multi-label)."
    )
  return image_key, label_key, label


class TfdsSource(source_lib.Source):
  """A prepared tfds dataset; records hold the still-encoded image bytes."""

  def __init__(self, config):
    name, data_dir = config.dataset, config.data_dir
    builder = _builder(name, data_dir)
    image_key, label_key, class_label = _label_spec(name, builder)
    splits = builder.info.splits
    train_split = config.train_split or "train"
    eval_split = config.eval_split or next((s for s in ("validation", "test") if s in splits), "")
    if not eval_split:
      raise ValueError(
        f"config.dataset={name!r} has no 'validation' or 'test' split; set "
        f"config.eval_split to one of {sorted(splits)} (slices like "
        "'train[-5%:]' work too)."
      )
    sizes = {}
    for key, split in (("train_split", train_split), ("eval_split", eval_split)):
      try:
        sizes[split] = int(splits[split].num_examples)
      except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(
          f"config.{key}={split!r} is not a split of {name!r}: valid "
          f"{sorted(splits)} or tfds slices such as 'train[:90%]'."
        ) from e
      if sizes[split] == 0:
        raise ValueError(f"config.{key}={split!r} of {name!r} is empty.")
    label_feature = builder.info.features[label_key]
    multi_label = name.split(":")[0].split("/")[0] == OPEN_IMAGES or isinstance(
      label_feature, tfds.features.Sequence
    )
    super().__init__(
      name=name,
      num_classes=int(class_label.num_classes),
      multi_label=multi_label,
      class_names=tuple(class_label.names),
      train_split=train_split,
      eval_split=eval_split,
      split_sizes=sizes,
    )
    self._builder = builder
    self._image_key = image_key
    self._label_key = label_key
    self._open_images = name.split(":")[0].split("/")[0] == OPEN_IMAGES

  def _pieces(self, split: str, start: int, stop: int) -> list[str]:
    """tfds split strings covering examples [start, stop) of `split` (which may be a slice
    expression or a '+' of several), as absolute ranges of the underlying splits."""
    pieces, offset = [], 0
    for instr in tfds.core.ReadInstruction.from_spec(split).to_absolute(self._builder.info.splits):
      lo = instr.from_ or 0
      hi = instr.to
      if hi is None:
        hi = self._builder.info.splits[instr.splitname].num_examples
      a, b = max(start, offset), min(stop, offset + hi - lo)
      if a < b:
        pieces.append(f"{instr.splitname}[{lo + a - offset}:{lo + b - offset}]")
      offset += hi - lo
    return pieces

  def _to_record(self, example):
    label = example[self._label_key]
    if self._open_images:
      positive = label["confidence"] == OPEN_IMAGES_POSITIVE_CONFIDENCE
      label = tf.boolean_mask(label["label"], positive)
    return {"image": example[self._image_key], "label": tf.cast(label, tf.int64)}

  def records(self, split: str, start: int, stop: int) -> tf.data.Dataset:
    pieces = self._pieces(split, start, stop)
    empty = not pieces
    if empty:  # an empty shard still needs the right element structure
      pieces = self._pieces(split, 0, 1)
    datasets = [
      self._builder.as_dataset(
        split=piece,
        shuffle_files=False,
        decoders={self._image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False, add_tfds_id=False),
      ).map(self._to_record)
      for piece in pieces
    ]
    ds = datasets[0]
    for more in datasets[1:]:
      ds = ds.concatenate(more)
    return ds.take(0) if empty else ds
