"""The tf.data pipelines on the embedded datasets: batches, shards, eval padding, resumption."""
import hashlib

import numpy as np
import pytest

from configs import common
from xception_jax import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, **overrides):
  c = common.base_config()
  c.data_dir = data_dir
  c.image_size = 24
  c.batch_size = 16
  c.eval_batch_size = 32
  c.input.shuffle_buffer = 64
  for key, value in overrides.items():
    target = c
    *path, leaf = key.split(".")
    for part in path:
      target = target[part]
    target[leaf] = value
  return c


def _digest(array):
  return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_single_label_train_and_eval_batches(data_dir):
  c = _config(data_dir)
  info = data.dataset_info(c)
  assert info.name == "embedded_shapes" and info.num_classes == 10 and not info.multi_label
  assert info.class_names[0] == "horizontal_stripes" and len(info.class_names) == 10
  assert (info.num_train_examples, info.num_eval_examples) == (3000, 600)
  batch = next(data.create_train_iterator(c, info, process_index=0, process_count=2))
  assert batch["image"].shape == (8, 24, 24, 3) and batch["image"].dtype == np.uint8
  assert batch["image"].min() < 64 and batch["image"].max() > 192  # full pixel range in use
  pixels = data.model_input(batch["image"])
  assert pixels.dtype == np.float32 and -1.0 <= pixels.min() < 0.0 < pixels.max() <= 1.0
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert set(batch["label"]) <= set(range(10))
  eval_batch = next(iter(data.create_eval_iterator(c, info, process_index=0, process_count=1)))
  assert eval_batch["image"].shape == (32, 24, 24, 3)
  assert eval_batch["mask"].dtype == np.float32 and eval_batch["mask"].shape == (32,)


def test_multi_label_batches_are_multi_hot(data_dir):
  c = _config(data_dir, dataset="embedded_shapes_multilabel")
  info = data.dataset_info(c)
  assert info.multi_label and info.num_classes == 24
  assert info.class_names[0] == "red_horizontal_stripes"
  assert info.class_frequencies.shape == (24,) and 0.05 < info.class_frequencies.mean() < 0.2
  batch = next(data.create_train_iterator(c, info, process_index=0, process_count=1))
  assert batch["label"].shape == (16, 24) and batch["label"].dtype == np.float32
  assert set(np.unique(batch["label"])) <= {0.0, 1.0}
  positives = batch["label"].sum(axis=1)
  assert positives.min() >= 1 and positives.max() <= 4  # 1-4 objects per image


def test_num_classes_override_and_validation(data_dir):
  c = _config(data_dir, num_classes=12)
  info = data.dataset_info(c)
  assert info.num_classes == 12 and len(info.class_names) == 12
  with pytest.raises(ValueError, match="config.num_classes=5 is smaller than the 10 classes"):
    data.dataset_info(_config(data_dir, num_classes=5))


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_train_shards_are_disjoint_and_complete(data_dir, process_count):
  # No augmentation (whole image, no flip): an example's pixels identify it.
  c = _config(data_dir, train_split="train[:120]", batch_size=8 * process_count, image_size=12,
              **{"input.area_range": (1.0, 1.0), "input.aspect_ratio_range": (1.0, 1.0),
                 "input.flip": False})
  info = data.dataset_info(c)
  seen = []
  for p in range(process_count):
    shard = 120 // process_count
    iterator = data.create_train_iterator(c, info, process_index=p, process_count=process_count)
    images = np.concatenate([next(iterator)["image"] for _ in range(-(-shard // 8))])[:shard]
    seen.append({_digest(image) for image in images})
    assert len(seen[-1]) == shard  # one epoch of the shard: every example once
  assert sum(len(s) for s in seen) == len(set().union(*seen)) == 120


@pytest.mark.parametrize("process_count,eval_batch_size", [(1, 32), (2, 16), (3, 12), (4, 32)])
def test_eval_counts_every_example_once(data_dir, process_count, eval_batch_size):
  c = _config(data_dir, eval_split="validation[:101]", eval_batch_size=eval_batch_size)
  info = data.dataset_info(c)
  assert info.num_eval_examples == 101
  digests, batch_counts = [], []
  for p in range(process_count):
    iterable = data.create_eval_iterator(c, info, process_index=p, process_count=process_count)
    batches = list(iterable)
    assert len(batches) == len(iterable)
    batch_counts.append(len(batches))
    for batch in batches:
      assert batch["image"].shape[0] == eval_batch_size // process_count
      real = batch["mask"] == 1.0
      assert np.all(batch["image"][~real] == 0.0)
      digests += [_digest(image) for image in batch["image"][real]]
  assert len(set(batch_counts)) == 1  # every process runs the same number of eval steps
  assert len(digests) == len(set(digests)) == 101
  # A second pass over the same iterable yields the same examples again.
  again = data.create_eval_iterator(c, info, process_index=0, process_count=process_count)
  assert sum(b["mask"].sum() for b in again) == sum(b["mask"].sum() for b in again)


def test_restored_iterator_matches_uninterrupted(data_dir):
  # 100 examples, 2 processes, 8 per process per step: epochs end mid-batch (50 / 8).
  c = _config(data_dir, train_split="train[:100]", batch_size=16, seed=7,
              **{"input.color_distortion": True})
  info = data.dataset_info(c)
  for p in range(2):
    full = data.create_train_iterator(c, info, process_index=p, process_count=2)
    reference = [next(full) for _ in range(10)]
    restored = data.create_train_iterator(c, info, start_step=6, process_index=p, process_count=2)
    for step in range(6, 10):
      batch = next(restored)
      np.testing.assert_array_equal(batch["image"], reference[step]["image"])
      np.testing.assert_array_equal(batch["label"], reference[step]["label"])
  other_seed = next(data.create_train_iterator(_config(data_dir, train_split="train[:100]", seed=8),
                                               info, process_index=0, process_count=2))
  assert not np.array_equal(other_seed["image"], reference[0]["image"])


def test_bad_config_values_fail_fast(data_dir):
  with pytest.raises(ValueError,
                     match=r"config.input.bad_files='maybe'; valid: \['skip', 'error'\]"):
    data.dataset_info(_config(data_dir, **{"input.bad_files": "maybe"}))
  with pytest.raises(ValueError, match="config.input.area_range"):
    data.dataset_info(_config(data_dir, **{"input.area_range": (0.5, 0.1)}))
  with pytest.raises(ValueError, match="not divisible by the number of JAX processes"):
    info = data.dataset_info(_config(data_dir))
    data.create_train_iterator(_config(data_dir, batch_size=10), info, process_index=0,
                               process_count=4)
  with pytest.raises(ValueError, match="config.train_split='nope' is not a split"):
    data.dataset_info(_config(data_dir, train_split="nope"))


def test_unknown_dataset_and_missing_manual_download_fail_fast(tmp_path):
  with pytest.raises(ValueError, match="config.dataset='no_such_dataset' is not a tfds dataset"):
    data.dataset_info(_config(str(tmp_path), dataset="no_such_dataset"))
  with pytest.raises(FileNotFoundError) as error:
    data.dataset_info(_config(str(tmp_path), dataset="imagenet2012"))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "downloads" / "manual") in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared .* `tfds build cifar10"):
    data.dataset_info(_config(str(tmp_path), dataset="cifar10"))


def test_tensorflow_is_shown_no_gpus(monkeypatch):
  """The pipeline hides GPUs from TensorFlow (a GPU build would take their memory from JAX)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from xception_jax.data import pipeline  # pylint: disable=g-import-not-at-top,unused-import
  from xception_jax.data import tf_host  # pylint: disable=g-import-not-at-top
  assert not tf.config.get_visible_devices("GPU")
  calls = []
  monkeypatch.setattr(tf.config, "list_physical_devices",
                      lambda kind: ["/physical_device:GPU:0"] if kind == "GPU" else [])
  monkeypatch.setattr(tf.config, "set_visible_devices",
                      lambda devices, kind: calls.append((list(devices), kind)))
  tf_host.hide_accelerators()
  assert calls == [([], "GPU")]
