"""User data: image folders with bad files, empty/missing folders, manifests, the input bench."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import common
from xception_jax import data
from xception_jax.data import imagefolder
from xception_jax.data import manifest
from xception_jax.tools import input_bench


def _save(path, size=(20, 16), fmt="JPEG", mode="RGB", seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, fmt)


def _make_folder(root, with_bad=True):
  """3 classes x 4 train images (JPEG, grey JPEG, PNG, tiny), 2 val images per class."""
  for c, name in enumerate(("cat", "dog", "fox")):
    _save(f"{root}/train/{name}/a.jpg", seed=c)
    _save(f"{root}/train/{name}/b.jpg", mode="L", seed=10 + c)
    _save(f"{root}/train/{name}/sub/c.png", fmt="PNG", seed=20 + c)
    _save(f"{root}/train/{name}/d.jpg", size=(2, 3), seed=30 + c)
    for i in range(2):
      _save(f"{root}/val/{name}/{i}.png", fmt="PNG", seed=40 + 2 * c + i)
  with open(f"{root}/train/cat/.DS_Store", "wb") as f:  # hidden: ignored silently
    f.write(b"\0\1")
  bad = []
  if with_bad:
    good = open(f"{root}/train/cat/a.jpg", "rb").read()
    with open(f"{root}/train/dog/truncated.jpg", "wb") as f:
      f.write(good[: len(good) // 2])
    with open(f"{root}/train/fox/notes.txt", "w") as f:
      f.write("not an image")
    bad = [f"{root}/train/dog/truncated.jpg", f"{root}/train/fox/notes.txt"]
  return bad


def _config(root, tmp_path, **overrides):
  c = common.base_config()
  c.dataset = f"imagefolder:{root}"
  c.data_dir = str(tmp_path / "tfds")
  c.image_size = 16
  c.batch_size = 4
  c.eval_batch_size = 4
  c.input.shuffle_buffer = 16
  c.input.update(overrides)
  return c


def test_bad_files_are_skipped_with_warnings_naming_each(tmp_path):
  root = str(tmp_path / "photos")
  bad = _make_folder(root)
  with pytest.warns(imagefolder.BadImageWarning) as record:
    info = data.dataset_info(_config(root, tmp_path, bad_files="skip"))
  messages = [str(w.message) for w in record]
  for path in bad:
    assert any(path in m for m in messages), (path, messages)
  assert any("Skipped 2 bad file(s) of 14" in m for m in messages)
  assert info.class_names == ("cat", "dog", "fox") and info.num_classes == 3
  assert (info.num_train_examples, info.num_eval_examples) == (12, 6)
  # Several epochs of training never meet a bad file (no crash mid-epoch).
  iterator = data.create_train_iterator(
    _config(root, tmp_path, bad_files="skip"), info, process_index=0, process_count=1
  )
  for _ in range(7):
    batch = next(iterator)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
  eval_batches = list(
    data.create_eval_iterator(
      _config(root, tmp_path, bad_files="skip"), info, process_index=0, process_count=1
    )
  )
  assert sum(b["mask"].sum() for b in eval_batches) == 6 and len(eval_batches) == 2


def test_bad_files_error_mode_refuses_before_training(tmp_path):
  root = str(tmp_path / "photos")
  bad = _make_folder(root)
  with pytest.raises(ValueError, match=r"2 bad file\(s\)") as error:
    data.dataset_info(_config(root, tmp_path, bad_files="error"))
  for path in bad:
    assert path in str(error.value)
  assert "not a JPEG or PNG image" in str(error.value) and "corrupt image" in str(error.value)


def test_scan_cache_is_reused(tmp_path, monkeypatch):
  root = str(tmp_path / "photos")
  _make_folder(root, with_bad=False)
  data.dataset_info(_config(root, tmp_path))
  calls = []
  monkeypatch.setattr(imagefolder, "check_image", lambda path: calls.append(path) or "")
  imagefolder.scan.cache_clear()
  imagefolder.scan(root, "train", None, "skip", str(tmp_path / "tfds"))
  assert calls == []  # every file's verdict came from the cache


def test_empty_and_missing_folders_fail_fast(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist. Expected ROOT/train/CLASS"):
    data.dataset_info(_config(str(tmp_path / "nowhere"), tmp_path))
  os.makedirs(tmp_path / "empty" / "train")
  os.makedirs(tmp_path / "empty" / "val")
  with pytest.raises(FileNotFoundError, match="has no class sub-folders"):
    data.dataset_info(_config(str(tmp_path / "empty"), tmp_path))
  os.makedirs(tmp_path / "noimages" / "train" / "cat")
  os.makedirs(tmp_path / "noimages" / "val" / "cat")
  with pytest.raises(FileNotFoundError, match="has no usable JPEG or PNG images"):
    data.dataset_info(_config(str(tmp_path / "noimages"), tmp_path))
  _save(str(tmp_path / "noval" / "train" / "cat" / "a.jpg"))
  with pytest.raises(FileNotFoundError, match="no eval split folder"):
    data.dataset_info(_config(str(tmp_path / "noval"), tmp_path))


def test_manifest_to_multi_label_tfds_dataset(tmp_path):
  for i in range(5):
    _save(str(tmp_path / "img" / f"{i}.jpg"), seed=i)
  (tmp_path / "img" / "bad.jpg").write_text("not an image")
  (tmp_path / "train.csv").write_text(
    "image,labels\nimg/0.jpg,cat dog\nimg/1.jpg,dog\nimg/2.jpg,fox;cat\nimg/bad.jpg,cat\n"
  )
  (tmp_path / "val.jsonl").write_text(
    json.dumps({"image": "img/3.jpg", "labels": ["fox"]})
    + "\n"
    + json.dumps({"image": str(tmp_path / "img" / "4.jpg"), "labels": [0, 1]})
    + "\n"
  )
  data_dir = str(tmp_path / "tfds")
  manifest.build(
    "my_tags",
    {"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "val.jsonl")},
    data_dir,
    class_names=["cat", "dog", "fox"],
  )
  c = common.base_config()
  c.dataset, c.data_dir, c.image_size, c.batch_size, c.eval_batch_size = (
    "my_tags",
    data_dir,
    16,
    2,
    4,
  )
  info = data.dataset_info(c)
  assert info.multi_label and info.class_names == ("cat", "dog", "fox")
  assert (info.num_train_examples, info.num_eval_examples) == (3, 2)
  (batch,) = list(data.create_eval_iterator(c, info, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch["label"], [[0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(batch["mask"], [1, 1, 0, 0])
  with pytest.raises(ValueError, match="label 'wolf' .* is not an integer id nor a name"):
    (tmp_path / "wolf.csv").write_text("img/0.jpg,wolf\n")
    manifest.build(
      "other", {"train": str(tmp_path / "wolf.csv")}, data_dir, class_names=["cat", "dog", "fox"]
    )


def test_input_bench_measures_the_train_pipeline(tmp_path):
  root = str(tmp_path / "photos")
  _make_folder(root, with_bad=False)
  result = input_bench.measure(_config(root, tmp_path), batches=3, warmup_batches=1)
  assert result["images_per_sec"] > 0 and result["cores"] >= 1
  assert result["images_per_sec_per_core"] == pytest.approx(
    result["images_per_sec"] / result["cores"]
  )
  baseline = input_bench.measure(
    _config(root, tmp_path), batches=3, warmup_batches=1, baseline="decode"
  )
  assert baseline["baseline"] == "decode" and baseline["images_per_sec"] > 0


def test_imagefolder_process_shards_mix_classes(tmp_path):
  # Files are listed class by class; each process's contiguous shard must still mix classes.
  root = str(tmp_path / "photos")
  _make_folder(root, with_bad=False)
  c = _config(root, tmp_path)
  c.batch_size = 12  # 2 processes x 6 = one epoch of each 6-example shard
  info = data.dataset_info(c)
  labels = [
    next(data.create_train_iterator(c, info, process_index=p, process_count=2))["label"]
    for p in range(2)
  ]
  assert all(len(set(l.tolist())) >= 2 for l in labels)
  np.testing.assert_array_equal(np.bincount(np.concatenate(labels), minlength=3), [4, 4, 4])
