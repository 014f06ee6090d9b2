"""Inference export: parity with the model's eval mode, portability, metadata, and clear errors.

Variables are random but non-trivial (batch statistics far from 0/1, EMA != raw weights), so
evaluation-mode batch norm and the choice of weights both show in the outputs. Parity tests write
the export with `export.write_export` from in-memory variables (an orbax save of a full-size model
takes ~20 s on 2 cores); the workdir tests go through a real orbax checkpoint written from 8
devices and the command line.

Default run: full-size Xception at 299x299, the registered tiny Inception V3 and a tiny Xception
with 4 segments. `python -m pytest -m slow tests/test_export.py` adds full-size Inception V3 and
full-size Xception with 4 segments at 299x299 (about 30 s and 75 s on a busy 2-core machine).
"""

import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest
import xla_flags

from configs import quickstart
from xception_jax import checkpointing
from xception_jax import data
from xception_jax import export
from xception_jax import export_format
from xception_jax import models
from xception_jax import serving
from xception_jax import train
from xception_jax.data import preprocess_numpy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")


def make_config(model_name, image_size, **model_kwargs):
  config = quickstart.get_config("runlocal")
  config.unlock()
  config.model_name = model_name
  config.model = ml_collections.ConfigDict(model_kwargs)
  config.image_size = image_size
  return config


def random_variables(model, image_size, seed=0):
  """{'params', 'batch_stats'} as numpy: fan-in scaled kernels, batch stats away from 0 and 1."""
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
    jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
  )
  rng = np.random.default_rng(seed)

  def leaf(path, spec):
    name = path[-1].key
    if name == "kernel":
      return rng.standard_normal(spec.shape) / np.sqrt(np.prod(spec.shape[:-1]))
    if name == "scale":
      return 1.0 + 0.1 * rng.standard_normal(spec.shape)
    if name in ("bias", "mean"):
      return 0.1 * rng.standard_normal(spec.shape)
    if name == "var":
      return rng.uniform(0.5, 1.5, spec.shape)
    raise AssertionError(f"unexpected variable {path}")

  values = jax.tree_util.tree_map_with_path(
    lambda path, spec: np.asarray(leaf(path, spec), np.float32), shapes
  )
  return {"params": values["params"], "batch_stats": values["batch_stats"]}


def model_eval(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


def random_batch(n, image_size, seed=1):
  return (
    np.random.default_rng(seed).uniform(-1, 1, (n, image_size, image_size, 3)).astype(np.float32)
  )


def write_tiny_export(out, loss="softmax", class_names=CLASS_NAMES, saved_model=False):
  config = make_config("xception_tiny", 72)
  model = models.create_model(config, len(CLASS_NAMES))
  variables = random_variables(model, 72)
  run = {
    "num_classes": len(CLASS_NAMES),
    "loss": loss,
    "multi_label": loss == "sigmoid",
    "class_names": list(class_names) if class_names else None,
  }
  export.write_export(
    out, config, run, variables, source={"step": 3, "weights": "ema"}, saved_model=saved_model
  )
  return model, variables


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tiny") / "export")
  model, variables = write_tiny_export(out)
  return out, model, variables


# ----------------------------------------------------------------------------------------------
# Parity: the exported function == the model in eval mode.
# ----------------------------------------------------------------------------------------------

PARITY_CASES = [
  pytest.param("xception", 299, {}, "softmax", id="xception-full-299"),
  pytest.param("inception_v3_tiny", 75, {}, "sigmoid", id="inception_v3_tiny-sigmoid"),
  pytest.param("xception_tiny", 72, {"segments": "4"}, "softmax", id="xception_tiny-4-segments"),
  pytest.param(
    "inception_v3", 299, {}, "softmax", id="inception_v3-full-299", marks=pytest.mark.slow
  ),
  pytest.param(
    "xception",
    299,
    {"segments": "4"},
    "softmax",
    id="xception-full-299-4-segments",
    marks=pytest.mark.slow,
  ),
]


@pytest.mark.parametrize("model_name, image_size, model_kwargs, loss", PARITY_CASES)
def test_exported_function_matches_model_eval_at_batch_1_and_5(
  tmp_path, model_name, image_size, model_kwargs, loss
):
  config = make_config(model_name, image_size, **model_kwargs)
  model = models.create_model(config, 7)
  variables = random_variables(model, image_size)
  out = str(tmp_path / "export")
  export.write_export(
    out,
    config,
    {"num_classes": 7, "loss": loss},
    variables,
    source={"step": 0, "weights": "ema"},
    saved_model=False,
  )

  # The serialized function, straight from disk, with only jax: batch 5 and batch 1.
  with open(os.path.join(out, serving.FUNCTION_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  flat = dict(np.load(os.path.join(out, serving.VARIABLES_FILE)))
  images = random_batch(5, image_size)
  expected = model_eval(model, variables, images)
  activation = jax.nn.softmax if loss == "softmax" else jax.nn.sigmoid
  for batch in (images, images[:1]):
    n = batch.shape[0]
    outputs = exported.call(flat, batch)
    np.testing.assert_allclose(outputs["logits"], expected[:n], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
      outputs["probabilities"], activation(expected[:n]), rtol=0, atol=1e-5
    )


def test_batch_norm_is_not_folded_and_names_match_the_model(tiny_export):
  out, _, variables = tiny_export
  flat = dict(np.load(os.path.join(out, serving.VARIABLES_FILE)))
  expected = export_format.flatten_variables(variables)
  assert sorted(flat) == sorted(expected)
  assert any(k.startswith("batch_stats/") for k in flat)
  for name, value in expected.items():
    np.testing.assert_array_equal(flat[name], value)


# ----------------------------------------------------------------------------------------------
# From a training workdir written on 8 devices, through the command line.
# ----------------------------------------------------------------------------------------------

STEP = 7


@pytest.fixture(scope="module")
def workdir_8_devices(tmp_path_factory):
  """A workdir whose checkpoint is saved from state replicated over 8 devices.

  The saved tree holds the TrainState fields that exports read (step, params, batch_stats and
  their EMA); EMA differs from the raw weights so the default (EMA) is visible.
  """
  assert jax.device_count() == 8
  workdir = str(tmp_path_factory.mktemp("run"))
  config = make_config("xception_tiny", 72)
  model = models.create_model(config, len(CLASS_NAMES))
  raw = random_variables(model, 72, seed=0)
  ema = random_variables(model, 72, seed=1)
  state = {
    "step": np.int32(STEP),
    "params": raw["params"],
    "batch_stats": raw["batch_stats"],
    "ema_params": ema["params"],
    "ema_batch_stats": ema["batch_stats"],
  }
  state = jax.device_put(state, NamedSharding(jax.make_mesh((8,), ("data",)), P()))
  assert len(state["params"]["predictions"]["kernel"].sharding.device_set) == 8
  manager = checkpointing.create_manager(workdir, keep=1, best_metric="")
  checkpointing.save(manager, STEP, state)
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  info = data.DatasetInfo(
    name="embedded_shapes",
    num_classes=len(CLASS_NAMES),
    num_train_examples=100,
    num_eval_examples=10,
    multi_label=False,
    class_names=CLASS_NAMES,
  )
  train._write_run_info(
    workdir,
    config,
    info,
    model,  # pylint: disable=protected-access
    types.SimpleNamespace(params=raw["params"], batch_stats=raw["batch_stats"]),
    per_epoch=1.0,
    num_steps=STEP,
    loss_kind="softmax",
  )
  return workdir, model, raw, ema


@pytest.fixture(scope="module")
def workdir_export(workdir_8_devices, tmp_path_factory):
  workdir = workdir_8_devices[0]
  out = str(tmp_path_factory.mktemp("cli") / "export")
  assert export.main([f"--workdir={workdir}", f"--out={out}", "--saved_model=no"]) == 0
  return out


_FRESH_PROCESS = r"""
import importlib.abc, json, runpy, sys
# The export must run without Flax, the model code, the trainer, orbax or TensorFlow.
BLOCKED = ("flax", "optax", "orbax", "tensorflow", "ml_collections", "xception_jax.models",
           "xception_jax.train", "xception_jax.checkpointing")
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if any(name == b or name.startswith(b + ".") for b in BLOCKED):
      raise ImportError(f"{name} is blocked in this test")
    return None
sys.meta_path.insert(0, Blocker())
sys.argv = ["predict"] + sys.argv[1:]
try:  # exactly what `python -m xception_jax.predict ARGS` does
  runpy.run_module("xception_jax.predict", run_name="__main__", alter_sys=True)
  code = 0
except SystemExit as e:
  code = e.code
import jax
sys.stderr.write("\nREPORT " + json.dumps({"devices": jax.device_count(), "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in ("flax", "tensorflow", "orbax"))}) + "\n")
sys.exit(code)
"""


def test_export_from_8_devices_predicts_in_a_fresh_single_device_process(
  workdir_8_devices, workdir_export, tmp_path
):
  """`python -m xception_jax.predict` on one CPU device, with the model code made unimportable."""
  _, model, _, ema = workdir_8_devices
  paths = [str(tmp_path / f"{i}.png") for i in range(3)]
  arrays = [_png(path, (70 + 20 * i, 90, 3), seed=i) for i, path in enumerate(paths)]
  env = xla_flags.environ_without_device_count()
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _FRESH_PROCESS,
      f"--model={workdir_export}",
      "--json",
      f"--top_k={len(CLASS_NAMES)}",
      *paths,
      str(tmp_path / "missing.png"),
    ],
    env=env,
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 1, result.stderr[-3000:]  # 1: one file failed, the others ran
  report = json.loads(result.stderr.split("REPORT ")[-1])
  assert report == {"devices": 1, "loaded": []}
  results = json.loads(result.stdout)
  assert results[-1]["error"] == "file not found" and results[-1]["predictions"] == []
  preprocessed = np.stack([preprocess_numpy.eval_image(a, 72, 0.875) for a in arrays])
  expected = np.asarray(jax.nn.softmax(model_eval(model, ema, preprocessed)))  # EMA by default
  for row, result_for_file in zip(expected, results[:3]):
    assert result_for_file["error"] is None
    scores = np.zeros(len(CLASS_NAMES), np.float32)
    for prediction in result_for_file["predictions"]:
      assert prediction["label"] == CLASS_NAMES[prediction["index"]]
      scores[prediction["index"]] = prediction["score"]
    np.testing.assert_allclose(scores, row, rtol=0, atol=1e-5)


def test_metadata_describes_the_run(workdir_8_devices, workdir_export):
  workdir = workdir_8_devices[0]
  metadata = serving.read_metadata(workdir_export)
  assert metadata["format_version"] == serving.FORMAT_VERSION
  assert metadata["model"]["name"] == "xception_tiny"
  assert metadata["model"]["num_classes"] == len(CLASS_NAMES)
  assert metadata["class_names"] == list(CLASS_NAMES)
  assert metadata["input"]["shape"] == ["batch", 72, 72, 3]
  assert metadata["preprocessing"]["image_size"] == 72
  assert metadata["preprocessing"]["crop_fraction"] == 0.875
  assert metadata["output"] == {
    "keys": ["logits", "probabilities"],
    "activation": "softmax",
    "multi_label": False,
    "shape": ["batch", len(CLASS_NAMES)],
  }
  assert metadata["source"]["workdir"] == os.path.abspath(workdir)
  assert metadata["source"]["step"] == STEP
  assert metadata["source"]["weights"] == "ema"
  assert metadata["source"]["exported_at"]
  assert metadata["versions"]["jax"] == jax.__version__
  assert metadata["saved_model"] is None
  assert set(metadata["function"]["platforms"]) == set(export_format.EXPORT_PLATFORMS)
  # No partially written folder is left next to the export.
  parent = os.path.dirname(workdir_export)
  assert os.listdir(parent) == [os.path.basename(workdir_export)]


def test_raw_weights_flag_and_step(workdir_8_devices, tmp_path):
  workdir, _, raw, _ = workdir_8_devices
  out = str(tmp_path / "raw")
  assert (
    export.main(
      [
        f"--workdir={workdir}",
        f"--out={out}",
        f"--step={STEP}",
        "--raw_weights",
        "--saved_model=no",
      ]
    )
    == 0
  )
  flat = dict(np.load(os.path.join(out, serving.VARIABLES_FILE)))
  for name, value in export_format.flatten_variables(raw).items():
    np.testing.assert_array_equal(flat[name], value)
  assert serving.read_metadata(out)["source"]["weights"] == "raw"


def test_command_line_errors_name_the_problem(workdir_8_devices, workdir_export, tmp_path, capsys):
  workdir = workdir_8_devices[0]
  assert export.main([f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'a'}"]) == 1
  assert "config.json" in capsys.readouterr().err
  assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'b'}", "--step=999"]) == 1
  assert "999" in capsys.readouterr().err and not os.path.exists(tmp_path / "b")
  # An existing export is replaced only with --overwrite; another non-empty folder never.
  assert export.main([f"--workdir={workdir}", f"--out={workdir_export}"]) == 1
  assert "--overwrite" in capsys.readouterr().err
  other = tmp_path / "notes"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  assert export.main([f"--workdir={workdir}", f"--out={other}", "--overwrite"]) == 1
  assert "does not look like an export" in capsys.readouterr().err
  assert (other / "keep.txt").read_text() == "mine"


def test_checkpoint_that_does_not_match_the_config_is_refused(workdir_8_devices, tmp_path):
  workdir = workdir_8_devices[0]
  config = make_config("xception_small", 72)  # the checkpoint is xception_tiny's
  variables = checkpointing.load_variables(workdir, use_ema=True)
  with pytest.raises(ValueError, match="do not match the model the config describes"):
    export.write_export(
      str(tmp_path / "x"),
      config,
      {"num_classes": len(CLASS_NAMES)},
      variables,
      source={"step": STEP},
      saved_model=False,
    )


# ----------------------------------------------------------------------------------------------
# The predictor: preprocessing, batching, errors.
# ----------------------------------------------------------------------------------------------


def _png(path, shape, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return pixels


def test_predict_applies_the_eval_preprocessing_to_arrays_and_files(tiny_export, tmp_path):
  out, model, variables = tiny_export
  predictor = serving.load(out, max_batch_size=4)
  arrays = [
    np.random.default_rng(i).integers(0, 256, (60 + 17 * i, 90 - 5 * i, 3), dtype=np.uint8)
    for i in range(6)
  ]
  path = str(tmp_path / "image.png")
  arrays.append(_png(path, (81, 64, 3), seed=9))
  grey = arrays[0][..., 0]
  inputs = arrays[:6] + [path, grey]
  probabilities = predictor.predict(inputs)
  assert probabilities.shape == (8, len(CLASS_NAMES)) and probabilities.dtype == np.float32
  preprocessed = np.stack(
    [
      preprocess_numpy.eval_image(a, 72, 0.875)
      for a in arrays + [np.repeat(grey[..., None], 3, -1)]
    ]
  )
  expected = jax.nn.softmax(model_eval(model, variables, preprocessed))
  np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
  # A uint8 batch array is a list of images.
  np.testing.assert_allclose(
    predictor.predict(np.stack([a[:60, :60] for a in arrays[:2]])),
    predictor.predict([arrays[0][:60, :60], arrays[1][:60, :60]]),
    rtol=0,
    atol=1e-6,
  )
  top = predictor.top_k(probabilities[:1], k=3)[0]
  best = np.argsort(-probabilities[0])[:3]
  assert top == [
    {"label": CLASS_NAMES[i], "score": float(probabilities[0, i]), "index": int(i)} for i in best
  ]


def test_bad_arrays_give_clear_errors(tiny_export):
  predictor = serving.load(tiny_export[0])
  good = np.zeros((2, 72, 72, 3), np.float32)
  with pytest.raises(ValueError, match="rank 3"):
    predictor.run(good[0])
  with pytest.raises(ValueError, match="4 channels"):
    predictor.run(np.zeros((2, 72, 72, 4), np.float32))
  with pytest.raises(ValueError, match="dtype float64"):
    predictor.run(good.astype(np.float64))
  with pytest.raises(ValueError, match=r"dtype uint8.*Predictor.predict"):
    predictor.run(good.astype(np.uint8))
  with pytest.raises(ValueError, match="64x64"):
    predictor.run(np.zeros((2, 64, 64, 3), np.float32))
  with pytest.raises(serving.ImageError, match=r"images\[1\].*dtype float32"):
    predictor.predict([np.zeros((9, 9, 3), np.uint8), np.zeros((9, 9, 3), np.float32)])
  with pytest.raises(serving.ImageError, match=r"images\[0\].*shape \(9, 9, 5\)"):
    predictor.predict([np.zeros((9, 9, 5), np.uint8)])
  with pytest.raises(ValueError, match=r"predict\(\[image\]\)"):
    predictor.predict(np.zeros((9, 9, 3), np.uint8))
  with pytest.raises(TypeError, match="wrap"):
    predictor.predict("cat.jpg")


def test_unreadable_files_are_named(tiny_export, tmp_path):
  predictor = serving.load(tiny_export[0])
  good = str(tmp_path / "good.png")
  _png(good, (40, 50, 3), seed=0)
  truncated = tmp_path / "truncated.jpg"
  Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(truncated, quality=90)
  truncated.write_bytes(truncated.read_bytes()[:300])
  text = tmp_path / "notes.jpg"
  text.write_text("not an image")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  cases = {
    str(tmp_path / "missing.jpg"): "not found",
    str(truncated): "truncated or corrupt",
    str(text): "not an image",
    str(empty): "empty",
  }
  for path, reason in cases.items():
    with pytest.raises(serving.ImageError, match=reason) as info:
      predictor.predict([good, path])
    assert info.value.source == path
  assert predictor.predict([good]).shape == (1, len(CLASS_NAMES))


def _copy(tiny_export, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(tiny_export[0], target)
  return target


def test_incomplete_damaged_or_incompatible_exports_are_refused(tiny_export, tmp_path):
  with pytest.raises(serving.ExportFormatError, match="not a directory"):
    serving.load(tmp_path / "absent")
  missing_metadata = _copy(tiny_export, tmp_path, "a")
  os.remove(os.path.join(missing_metadata, serving.METADATA_FILE))
  with pytest.raises(serving.ExportFormatError, match="export.json is missing"):
    serving.load(missing_metadata)
  for name in (serving.VARIABLES_FILE, serving.FUNCTION_FILE):
    missing = _copy(tiny_export, tmp_path, f"missing-{name}")
    os.remove(os.path.join(missing, name))
    with pytest.raises(serving.ExportFormatError, match=f"{name} is missing"):
      serving.load(missing)
    truncated = _copy(tiny_export, tmp_path, f"truncated-{name}")
    path = os.path.join(truncated, name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(serving.ExportFormatError, match="truncated"):
      serving.load(truncated)
  corrupted = _copy(tiny_export, tmp_path, "corrupted")
  path = os.path.join(corrupted, serving.VARIABLES_FILE)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\x00\x01\x02\x03")
  with pytest.raises(serving.ExportFormatError, match="sha256"):
    serving.load(corrupted)
  newer = _copy(tiny_export, tmp_path, "newer")
  metadata_path = os.path.join(newer, serving.METADATA_FILE)
  with open(metadata_path) as f:
    metadata = json.load(f)
  metadata["format_version"] = serving.FORMAT_VERSION + 1
  with open(metadata_path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(serving.ExportFormatError, match="format version"):
    serving.load(newer)
  metadata["format_version"] = serving.FORMAT_VERSION
  del metadata["preprocessing"]["image_size"]
  with open(metadata_path, "w") as f:
    json.dump(metadata, f)
  with pytest.raises(serving.ExportFormatError, match="image_size"):
    serving.load(newer)
  with open(metadata_path, "w") as f:
    f.write("{ not json")
  with pytest.raises(serving.ExportFormatError, match="not valid JSON"):
    serving.load(newer)


# ----------------------------------------------------------------------------------------------
# TF SavedModel (jax2tf, native serialization).
# ----------------------------------------------------------------------------------------------


def test_saved_model_matches_model_and_serves_encoded_images(tmp_path):
  tf = pytest.importorskip("tensorflow")
  out = str(tmp_path / "export")
  model, variables = write_tiny_export(out, saved_model=True)
  metadata = serving.read_metadata(out)
  assert metadata["saved_model"]["dir"] == serving.SAVED_MODEL_DIR
  loaded = tf.saved_model.load(os.path.join(out, serving.SAVED_MODEL_DIR))
  images = random_batch(5, 72)
  expected = model_eval(model, variables, images)
  for batch in (images, images[:1]):
    outputs = loaded.signatures["predict_images"](images=tf.constant(batch))
    np.testing.assert_allclose(outputs["logits"].numpy(), expected[: len(batch)], rtol=0, atol=1e-4)
    np.testing.assert_allclose(
      outputs["probabilities"].numpy(), jax.nn.softmax(expected[: len(batch)]), rtol=0, atol=1e-4
    )
  # serving_default takes encoded bytes and preprocesses as evaluation does.
  paths = []
  for i, shape in enumerate([(90, 120, 3), (72, 72, 3), (200, 150, 3)]):
    paths.append(str(tmp_path / f"{i}.png"))
    _png(paths[-1], shape, seed=i)
  encoded = tf.constant([open(p, "rb").read() for p in paths])
  served = loaded.signatures["serving_default"](image_bytes=encoded)["probabilities"].numpy()
  np.testing.assert_allclose(served, serving.load(out).predict(paths), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_export_of_a_real_training_run_reproduces_its_ema_eval(tmp_path):
  """train_and_evaluate (2 steps, 8 devices) -> CLI export -> the run's own EMA eval metrics.

  About 3-4 minutes on a busy 2-core machine, almost all of it the training run's compilation.
  """
  import test_train  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path under pytest)

  config = test_train.tiny_config(total_steps=2)
  config.model.segments = "4"
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  metrics = train.train_and_evaluate(config, workdir)
  assert export.main([f"--workdir={workdir}", f"--out={out}", "--saved_model=no"]) == 0
  predictor = serving.load(out)
  info = data.dataset_info(config)
  assert predictor.class_names == list(info.class_names)
  losses, correct, count = 0.0, 0.0, 0.0
  for batch in data.create_eval_iterator(config, info, process_index=0, process_count=1):
    probabilities = predictor.predict_preprocessed(batch["image"])
    mask = batch["mask"].astype(np.float64)
    picked = probabilities[np.arange(len(mask)), batch["label"]]
    losses += float(np.sum(-np.log(np.maximum(picked, 1e-30)) * mask))
    correct += float(np.sum((np.argmax(probabilities, -1) == batch["label"]) * mask))
    count += float(mask.sum())
  assert count == info.num_eval_examples
  np.testing.assert_allclose(losses / count, metrics["eval/ema_loss"], rtol=1e-4)
  assert abs(correct / count - metrics["eval/ema_top1"]) <= 2 / count  # near-ties may flip
