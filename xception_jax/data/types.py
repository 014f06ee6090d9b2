"""What the data package hands the trainer: a `DatasetInfo` once, then `Batch`es.

Its own module so that the sources (`pipeline.py`, `tfds_source.py`, `synthetic.py`) and the
package's entry points (`data/__init__.py`) all import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from typing import Any
from typing import TypedDict


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before building the model.

  `train_split` / `eval_split` are the resolved split names (the config may leave them empty).
  """

  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  multi_label: bool
  class_names: tuple[str, ...] | None = None
  train_split: str = ""
  eval_split: str = ""


class Batch(TypedDict, total=False):
  """One batch, from every source alike (a plain dict at run time).

  image: [B, S, S, 3], uint8 pixels (tf.data training batches: a quarter of the bytes to move) or
    float32 already in [-1, 1] (eval batches, 'synthetic'); `data.model_input` maps both to
    what the models take.
  label: int32 [B] class ids, or float32 [B, num_classes] multi-hot (multi-label datasets).
  mask: eval batches only: float32 [B], 1 for a real example and 0 for padding.
  """

  image: Any
  label: Any
  mask: Any
