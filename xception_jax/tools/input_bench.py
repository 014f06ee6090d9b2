"""Throughput of the training input pipeline alone (no model), in images per second.

  python -m xception_jax.tools.input_bench --config=configs/quickstart.py \\
      [--config.dataset=imagefolder:/data/photos --config.image_size=299 ...] \\
      [--batches=50] [--warmup_batches=5] [--baseline=decode] [--json]

Why: on a CPU host the input pipeline, not the accelerator, can bound training speed; this
measures what the trainer's `data.create_train_iterator` delivers (numpy batches for this process,
decode + crop + resize + flip (+ colour) included) so the two can be compared with the step time
of `tools/benchmark.py`. `--baseline=decode` instead runs a plain full decode of the same encoded
records (same shard, same shuffle, same num_parallel_calls, no crop/resize/augmentation), the
reference the fused decode-and-crop training pipeline is held against.

Reported (one JSON object with --json): images_per_sec, images_per_sec_per_core (divided by
the CPU cores this process may run on), images_per_cpu_sec (images per second of CPU time used
by this process, all threads: the figure to compare on a machine shared with other jobs),
cores, batches, batch_size, image_size, dataset, baseline, seconds, cpu_seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence
import json
import os
import resource
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from xception_jax import config_check
from xception_jax import data

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_integer("batches", 50, "Batches to time (after the warm-up).")
flags.DEFINE_integer("warmup_batches", 5, "Batches run before timing (fills buffers, autotune).")
flags.DEFINE_enum(
  "baseline",
  "none",
  ["none", "decode"],
  "'decode': time a plain full decode of the same records instead.",
)
flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def cpu_cores() -> int:
  """CPU cores this process may run on (the affinity mask, not the machine's total)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _decode_baseline_iterator(config, info) -> Iterator:
  """Full decode of this process's shuffled train records, batched like the real pipeline."""
  import tensorflow as tf

  from xception_jax.data import pipeline
  from xception_jax.data import sharding

  source = pipeline._source(config)  # pylint: disable=protected-access
  batch = sharding.per_process_batch_size(int(config.batch_size), 1, "batch_size")
  n = source.num_examples(source.train_split)
  records = source.records(source.train_split, 0, n)
  ds = records.shuffle(min(int(config.input.shuffle_buffer), n), seed=0).repeat()

  def decode(record):
    image = tf.io.decode_image(source.load(record)["image"], channels=3, expand_animations=False)
    return tf.shape(image)[0]  # keep only a scalar so batching cost does not depend on size

  parallel = int(config.input.num_parallel_calls)
  ds = ds.map(
    decode, num_parallel_calls=tf.data.AUTOTUNE if parallel == -1 else parallel, deterministic=True
  )
  return iter(ds.batch(batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator())


def measure(config, batches: int, warmup_batches: int, baseline: str = "none") -> dict:
  """Runs the pipeline and returns the throughput figures."""
  config_check.validate(config, num_data_devices=1, process_count=1)  # one process, no mesh
  info = data.dataset_info(config)
  if baseline == "decode":
    if config.dataset == data.SYNTHETIC:
      raise ValueError("--baseline=decode needs a dataset of encoded images, not 'synthetic'.")
    iterator = _decode_baseline_iterator(config, info)
    process_batch = int(config.batch_size)
  else:
    iterator = data.create_train_iterator(config, info, process_index=0, process_count=1)
    process_batch = int(config.batch_size)
  for _ in range(warmup_batches):
    _block(next(iterator))
  start, cpu_start = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    _block(next(iterator))
  seconds = time.perf_counter() - start
  cpu_seconds = _cpu_seconds() - cpu_start
  cores = cpu_cores()
  images = batches * process_batch
  images_per_sec = images / seconds
  return dict(
    images_per_sec=images_per_sec,
    images_per_sec_per_core=images_per_sec / cores,
    images_per_cpu_sec=images / cpu_seconds if cpu_seconds > 0 else None,
    cores=cores,
    batches=batches,
    batch_size=process_batch,
    image_size=int(config.image_size),
    dataset=config.dataset,
    baseline=baseline,
    seconds=seconds,
    cpu_seconds=cpu_seconds,
  )


def _cpu_seconds() -> float:
  """User + system CPU time of this process, all threads (robust to a machine shared with
  other jobs, where wall-clock rates vary with the load)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _block(batch) -> None:
  for value in batch.values() if isinstance(batch, dict) else [batch]:
    if hasattr(value, "block_until_ready"):
      value.block_until_ready()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config=configs/X.py is required.")
  if FLAGS.batches < 1 or FLAGS.warmup_batches < 0:
    raise app.UsageError("--batches must be >= 1 and --warmup_batches >= 0.")
  result = measure(FLAGS.config, FLAGS.batches, FLAGS.warmup_batches, FLAGS.baseline)
  if FLAGS.json:
    print(json.dumps(result))
  else:
    print(
      f"{result['dataset']} at {result['image_size']}px, batch {result['batch_size']}"
      f"{' (plain full decode baseline)' if result['baseline'] != 'none' else ''}: "
      f"{result['images_per_sec']:.1f} images/s, "
      f"{result['images_per_sec_per_core']:.1f} images/s per core ({result['cores']} cores), "
      f"{result['images_per_cpu_sec'] or float('nan'):.1f} images per CPU-second"
    )


if __name__ == "__main__":
  app.run(main)
