"""The interface between where examples come from and how they are preprocessed.

A `Source` is a resolved dataset (a tfds builder, an image folder) that can hand out any
contiguous range of a split as a deterministic stream of undecoded records. Everything else
(sharding, shuffling, resumption, decoding, padding) is done once, in `pipeline.py`, so that a
user's folder of JPEGs travels exactly the same path as ImageNet.

Records are dicts {'image': ..., 'label': ...}: 'image' is whatever `load` turns into encoded
image bytes (the bytes themselves for tfds, a file path for image folders, so that the shuffle
buffer and the resume-skip hold paths rather than megabytes); 'label' is an int64 scalar
(single-label) or a 1-D int64 vector of class ids (multi-label).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

# The forms of `config.dataset` other than a tfds name (see `data/__init__.py`).
SYNTHETIC = "synthetic"
EMBEDDED_DATASETS = ("embedded_shapes", "embedded_shapes_multilabel")
IMAGEFOLDER_PREFIX = "imagefolder:"


@dataclasses.dataclass
class Source(abc.ABC):
  """A dataset resolved from `config.dataset`, checked to be present and readable."""

  name: str
  num_classes: int
  multi_label: bool
  class_names: tuple[str, ...] | None
  train_split: str
  eval_split: str
  split_sizes: dict[str, int]

  def num_examples(self, split: str) -> int:
    return self.split_sizes[split]

  @abc.abstractmethod
  def records(self, split: str, start: int, stop: int) -> Any:
    """tf.data.Dataset of the records [start, stop) of `split`, in a fixed order."""

  def load(self, record: dict[str, Any]) -> dict[str, Any]:
    """Turns a record's 'image' into encoded bytes (after shuffling and skipping)."""
    return record
