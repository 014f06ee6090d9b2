"""The synthetic dataset: device-made batches, no TensorFlow."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from xception_jax import data
from xception_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = common.base_config()
  c.dataset = "synthetic"
  c.image_size = 8
  c.batch_size = 16
  c.eval_batch_size = 24
  for key, value in overrides.items():
    c[key] = value
  return c


def test_make_batch_shapes_ranges_and_sharding():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  batch = synthetic.make_batch(jax.random.PRNGKey(0), 16, 8, 5, sharding=sharding)
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
  assert batch["label"].dtype == np.int32 and int(batch["label"].max()) < 5
  assert batch["image"].sharding.is_equivalent_to(sharding, 4)
  multi = synthetic.make_batch(
    jax.random.PRNGKey(0), 16, 8, 5, multi_label=True, dtype=jax.numpy.bfloat16
  )
  assert multi["label"].shape == (16, 5) and multi["image"].dtype == jax.numpy.bfloat16


def test_synthetic_iterators_without_tensorflow():
  c = _config()
  info = data.dataset_info(c)
  assert info.num_classes == 1000 and not info.multi_label
  first = [next(data.create_train_iterator(c, info, start_step=s)) for s in (0, 3)]
  iterator = data.create_train_iterator(c, info)
  batches = [next(iterator) for _ in range(4)]
  np.testing.assert_array_equal(batches[3]["image"], first[1]["image"])  # resumable
  assert batches[0]["image"].shape == (16, 8, 8, 3)  # global batch, sharded over devices
  assert len(batches[0]["image"].sharding.device_set) == jax.device_count()
  counts = []
  for p in range(3):
    iterable = data.create_eval_iterator(c, info, process_index=p, process_count=3)
    counts.append(sum(float(b["mask"].sum()) for b in iterable))
    assert all(b["image"].shape == (8, 8, 8, 3) for b in iterable)
  assert sum(counts) == synthetic.NUM_EVAL_EXAMPLES


def test_tf_free_modules_do_not_import_tensorflow():
  # A fresh interpreter: this test process has TF loaded by the other data tests.
  code = (
    "import sys\n"
    "from configs import common\n"
    "from xception_jax import data\n"
    "from xception_jax.data import preprocess_numpy, shapes, sharding, synthetic\n"
    "c = common.base_config(); c.dataset = 'synthetic'; c.image_size = 8; c.batch_size = 8\n"
    "info = data.dataset_info(c)\n"
    "next(data.create_train_iterator(c, info)); list(data.create_eval_iterator(c, info))\n"
    "preprocess_numpy.eval_image(shapes.render_single_label(0, 0)[0], 8)\n"
    "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
  )
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}
  )


def test_synthetic_num_classes_and_multi_label_from_config():
  info = data.dataset_info(_config(num_classes=7, loss="sigmoid"))
  assert info.num_classes == 7 and info.multi_label
  batch = next(data.create_train_iterator(_config(num_classes=7, loss="sigmoid"), info))
  assert batch["label"].shape == (16, 7)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    next(data.create_train_iterator(_config(batch_size=12), info))
