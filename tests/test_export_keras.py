"""`export --from=keras:xception`, then `predict`: Keras's classes by name, with no training run.

Offline: a Keras-layout Xception weight file with random weights (tests/keras_reference.py) and a
class index generated from tensorflow-datasets' ImageNet synsets are placed in a temporary
KERAS_HOME, and `keras_weights.FILES` is pointed at their md5s (the documented hook; the URLs lead
nowhere, so any download attempt fails the test). The predicted names must be those of Keras's
own top classes for the same preprocessed images.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

import keras_reference
from xception_jax import export
from xception_jax import keras_weights
from xception_jax import predict
from xception_jax.data import eval_preprocess

SIZE = 75  # the exported function's input size (Xception's weights work at any size >= 71)


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
  """KERAS_HOME with models/ holding the weight file and class index; and Keras's model."""
  home = tmp_path_factory.mktemp("keras_home")
  models_dir = home / "models"
  models_dir.mkdir()
  model = keras_reference.randomized_model("xception", include_top=True,
                                           input_shape=(SIZE, SIZE, 3), seed=7)
  keras_reference.save_h5(model, models_dir, keras_weights.FILES["xception"].filename)
  synsets = keras_weights.tfds_imagenet_synsets() or tuple(f"n{i:08d}" for i in range(1000))
  index = {str(i): [s, f"{s}_name"] for i, s in enumerate(synsets)}
  (models_dir / "imagenet_class_index.json").write_text(json.dumps(index))
  return home, model, synsets


@pytest.fixture
def keras_files(keras_home, monkeypatch):
  home, _, _ = keras_home
  monkeypatch.setenv("KERAS_HOME", str(home))
  for name in ("xception", keras_weights.CLASS_INDEX):
    file = keras_weights.FILES[name]
    md5 = hashlib.md5((home / "models" / file.filename).read_bytes()).hexdigest()
    monkeypatch.setitem(keras_weights.FILES, name, keras_weights.KerasFile(
        file.filename, "http://127.0.0.1:9/unreachable", md5))
  return home


def test_export_from_keras_then_predict_prints_kerass_top_classes(keras_home, keras_files,
                                                                   tmp_path, capsys):
  _, keras_model, synsets = keras_home
  out = str(tmp_path / "export")
  assert export.main(["--from=keras:xception", f"--out={out}", f"--image-size={SIZE}",
                      "--saved-model=no"]) == 0
  metadata = json.load(open(os.path.join(out, export.METADATA_FILE)))
  assert metadata["class_ids"] == list(synsets)
  assert metadata["class_names"][:2] == [f"{synsets[0]}_name", f"{synsets[1]}_name"]
  assert metadata["source"]["keras"] == "keras:xception"

  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    path = str(tmp_path / f"photo{i}.png")
    Image.fromarray(rng.integers(0, 256, (90 + 10 * i, 100, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  capsys.readouterr()
  assert predict.main(["--model", out, "--json", "--top-k=3", *paths]) == 0
  results = json.loads(capsys.readouterr().out)

  images = np.stack([eval_preprocess.eval_image(open(p, "rb").read(), SIZE, 0.875)
                     for p in paths])  # what predict did (export.json's preprocessing)
  assert metadata["preprocessing"]["crop_fraction"] == 0.875
  keras_logits = keras_reference.predict(keras_model, images)
  for result, logits in zip(results, keras_logits):
    top = np.argsort(-logits)[:3]
    assert [p["label"] for p in result["predictions"]] == [f"{synsets[j]}_name" for j in top]


def test_export_from_keras_refuses_notop_and_unknown_names(tmp_path, capsys):
  assert export.main(["--from=keras:xception_notop", f"--out={tmp_path / 'a'}"]) == 1
  assert "no classifier" in capsys.readouterr().err
  assert export.main(["--from=keras:vgg16", f"--out={tmp_path / 'b'}"]) == 1
  assert "keras:xception, keras:xception_notop" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export.parse_args(["--from=keras:xception", "--out=x", "--step=3"])


def test_export_from_keras_offline_error_names_url_and_path(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_home"))
  file = keras_weights.FILES["inception_v3"]
  monkeypatch.setitem(keras_weights.FILES, "inception_v3", keras_weights.KerasFile(
      file.filename, "http://127.0.0.1:9/inception_v3.h5", file.md5))
  assert export.main(["--from=keras:inception_v3", f"--out={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err
  assert "Cannot download http://127.0.0.1:9/inception_v3.h5" in err
  assert str(tmp_path / "empty_home" / "models" / file.filename) in err
  assert not os.path.exists(tmp_path / "out")
