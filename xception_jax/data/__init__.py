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

from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any

import numpy as np

from xception_jax.data.sharding import eval_batch_size
from xception_jax.data.source import EMBEDDED_DATASETS
from xception_jax.data.source import IMAGEFOLDER_PREFIX
from xception_jax.data.source import SYNTHETIC
from xception_jax.data.types import Batch
from xception_jax.data.types import DatasetInfo

__all__ = [
  "Batch",
  "DatasetInfo",
  "EMBEDDED_DATASETS",
  "IMAGEFOLDER_PREFIX",
  "SYNTHETIC",
  "create_eval_iterator",
  "create_train_iterator",
  "dataset_info",
  "eval_batch_size",
  "model_input",
  "to_global",
]


def dataset_info(config) -> DatasetInfo:
  """Resolves `config.dataset`, checks it is present, and describes it.

  Fails fast (before any compilation) with ValueError / FileNotFoundError saying what to download
  or prepare and where, for a missing dataset, a missing manual download, or an empty folder.
  The config's settings are checked once, before, by `config_check.validate`.
  """
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


def create_train_iterator(
  config,
  info: DatasetInfo,
  start_step: int = 0,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  sharding: Any = None,
) -> Iterator[Batch]:
  """An infinite iterator of training batches, starting at `start_step`.

  With `sharding` (what the trainer passes, e.g. NamedSharding(mesh, P('data'))) every source
  yields the same thing: GLOBAL jax.Arrays of config.batch_size examples laid out by it, each
  process contributing its own rows. Without it, the tf.data sources yield this process's numpy
  arrays (B = config.batch_size // process_count, for tests and input benchmarks) and 'synthetic'
  global arrays split over all devices. Images are uint8 pixels from tf.data and float32 in
  [-1, 1] from 'synthetic'; `model_input` turns both into the model's input on the accelerator.
  """
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  if config.dataset == SYNTHETIC:
    from xception_jax.data import synthetic

    return synthetic.train_iterator(config, info, start_step, sharding=sharding)
  from xception_jax.data import pipeline

  process_index, process_count = _process(process_index, process_count)
  batches = pipeline.train_iterator(config, info, start_step, process_index, process_count)
  return batches if sharding is None else (to_global(b, sharding) for b in batches)


def model_input(images: Any) -> Any:
  """Images as the models take them: uint8 pixels -> float32 x / 127.5 - 1 in [-1, 1];
  floating-point images (eval batches, synthetic data) are returned unchanged.

  Works on numpy arrays and on jax arrays inside jit, where the training step calls it so that
  the conversion runs on the accelerator (see `preprocess_tf.py` for why batches travel as uint8).
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images


def create_eval_iterator(
  config,
  info: DatasetInfo,
  *,
  process_index: int | None = None,
  process_count: int | None = None,
  sharding: Any = None,
) -> Iterable[Batch]:
  """A finite iterable (fresh on each call, with len()) of eval batches.

  Yields {'image', 'label', 'mask'}: this process's numpy arrays with
  B = eval_batch_size(config) // process_count, or, with `sharding`, the global jax.Arrays they
  make together. Every process yields the same number of batches; the tail is padded with mask-0
  examples so every eval example counts exactly once overall.
  """
  process_index, process_count = _process(process_index, process_count)
  if config.dataset == SYNTHETIC:
    from xception_jax.data import synthetic

    batches = synthetic.eval_iterable(config, info, process_index, process_count)
  else:
    from xception_jax.data import pipeline

    batches = pipeline.eval_iterable(config, info, process_index, process_count)
  return batches if sharding is None else _GlobalBatches(batches, sharding)


def to_global(batch: Batch, sharding: Any) -> Batch:
  """Assembles each process's part of a batch into one global array per key (laid out by
  `sharding`); arrays that already are global jax.Arrays pass through."""
  import jax

  return {
    k: v
    if isinstance(v, jax.Array)
    else jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in batch.items()
  }


class _GlobalBatches:
  """An eval iterable whose batches are made global (keeps len(), re-iterable)."""

  def __init__(self, batches: Iterable[Batch], sharding: Any):
    self._batches, self._sharding = batches, sharding

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self) -> Iterator[Batch]:
    return (to_global(b, self._sharding) for b in self._batches)
