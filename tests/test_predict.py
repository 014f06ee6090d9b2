"""The predict command: top-k per file, JSON and text output, per-file errors, exit status."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import quickstart
from xception_jax import export
from xception_jax import models
from xception_jax import predict
from xception_jax import serving

CLASS_NAMES = ["red", "green", "blue", "cyan", "magenta", "yellow"]
IMAGE_SIZE = 72


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """A tiny Xception export with random weights and non-trivial batch statistics."""
  config = quickstart.get_config("runlocal")
  config.unlock()
  config.model_name = "xception_tiny"
  config.model = ml_collections.ConfigDict()
  config.image_size = IMAGE_SIZE
  model = models.create_model(config, len(CLASS_NAMES))
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
    jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
  )
  rng = np.random.default_rng(0)
  scales = {"kernel": None, "scale": 0.1, "bias": 0.1, "mean": 0.1, "var": 0.3}

  def leaf(path, spec):
    name = path[-1].key
    if name == "kernel":
      value = rng.standard_normal(spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))
    else:
      value = (1.0 if name in ("scale", "var") else 0.0) + scales[name] * rng.uniform(
        -1, 1, spec.shape
      )
    return np.asarray(value, np.float32)

  variables = jax.tree_util.tree_map_with_path(leaf, shapes)
  out = str(tmp_path_factory.mktemp("predict") / "export")
  export.write_export(
    out,
    config,
    {"num_classes": len(CLASS_NAMES), "loss": "softmax", "class_names": CLASS_NAMES},
    variables,
    source={"step": 1, "weights": "ema"},
    saved_model=False,
  )
  return out


def _images(folder, count, seed=0):
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    path = os.path.join(folder, f"image{i}.png")
    shape = (int(rng.integers(40, 120)), int(rng.integers(40, 120)), 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def test_json_lists_every_file_in_order_with_errors_and_exit_status_1(export_dir, tmp_path, capsys):
  good = _images(str(tmp_path), 3)
  missing = str(tmp_path / "missing.jpg")
  text = tmp_path / "readme.png"
  text.write_text("hello")
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(open(good[0], "rb").read()[:120])
  files = [good[0], missing, good[1], str(text), str(truncated), good[2]]
  assert predict.main([f"--model={export_dir}", "--json", "--top_k=2", *files]) == 1
  captured = capsys.readouterr()
  results = json.loads(captured.out)
  assert [r["file"] for r in results] == files
  probabilities = serving.load(export_dir).predict(good)
  for result, expected in zip([results[i] for i in (0, 2, 5)], probabilities):
    assert result["error"] is None
    best = np.argsort(-expected)[:2]
    assert [p["label"] for p in result["predictions"]] == [CLASS_NAMES[i] for i in best]
    assert [p["index"] for p in result["predictions"]] == best.tolist()
    np.testing.assert_allclose(
      [p["score"] for p in result["predictions"]], expected[best], rtol=0, atol=1e-6
    )
  for result, reason in zip(
    [results[i] for i in (1, 3, 4)], ("not found", "not an image", "truncated")
  ):
    assert result["predictions"] == [] and reason in result["error"]
  assert "3 of 6 file(s) could not be classified" in captured.err


def test_text_output_and_exit_status_0(export_dir, tmp_path, capsys):
  files = _images(str(tmp_path), 2, seed=1)
  assert predict.main([f"--model={export_dir}", "--top_k=10", *files]) == 0
  lines = capsys.readouterr().out.splitlines()
  # --top_k larger than the class count lists every class once.
  assert len(lines) == 2 * (1 + len(CLASS_NAMES))
  assert lines[0] == files[0] and lines[1 + len(CLASS_NAMES)] == files[1]
  scores = [float(line.split()[0]) for line in lines[1 : 1 + len(CLASS_NAMES)]]
  labels = [line.split()[1] for line in lines[1 : 1 + len(CLASS_NAMES)]]
  assert sorted(labels) == sorted(CLASS_NAMES)
  assert scores == sorted(scores, reverse=True)
  assert abs(sum(scores) - 1.0) < 1e-3


def test_progress_bar_on_stderr_for_many_files(export_dir, tmp_path, capsys):
  files = _images(str(tmp_path), 10, seed=2)
  assert predict.main([f"--model={export_dir}", "--json", "--batch_size=4", *files]) == 0
  captured = capsys.readouterr()
  assert "10/10 files" in captured.err
  assert len(json.loads(captured.out)) == 10  # stdout holds only the results
  assert predict.main([f"--model={export_dir}", "--json", files[0]]) == 0
  assert capsys.readouterr().err == ""


def test_unusable_export_or_arguments_exit_2(export_dir, tmp_path, capsys):
  assert predict.main([f"--model={tmp_path / 'nowhere'}", "a.jpg"]) == 2
  assert "not a directory" in capsys.readouterr().err
  incomplete = tmp_path / "incomplete"
  incomplete.mkdir()
  (incomplete / serving.VARIABLES_FILE).write_bytes(b"")
  assert predict.main([f"--model={incomplete}", "a.jpg"]) == 2
  assert "export.json is missing" in capsys.readouterr().err
  with pytest.raises(SystemExit) as info:
    predict.main([f"--model={export_dir}", "--top_k=0", "a.jpg"])
  assert info.value.code == 2
  assert "--top_k=0" in capsys.readouterr().err
