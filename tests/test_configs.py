"""Every config in configs/ builds, and runs 2 steps in its `runlocal` form."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from xception_jax import train

CONFIG_FILES = sorted(
  p
  for p in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py"))
  if os.path.basename(p) not in ("__init__.py", "common.py")
)


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# finetune.py's runlocal starts from Keras's ImageNet weights (a download); tests/test_finetune.py
# runs it on a generated Keras file instead.
RUNLOCAL_FILES = [p for p in CONFIG_FILES if os.path.basename(p) != "finetune.py"]


def test_all_recipes_are_found():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {
    "imagenet.py",
    "inception_v3_imagenet.py",
    "jft_like.py",
    "spectrum.py",
    "quickstart.py",
    "finetune.py",
  } <= names


def test_configs_load_from_another_working_directory(tmp_path):
  """--config=/abs/path/configs/X.py from any folder, through ml_collections' flag as main.py."""
  script = "\n".join(
    [
      "import sys",
      "from absl import flags",
      "from ml_collections import config_flags",
      "config_flags.DEFINE_config_file('config', None, '')",
      "original = list(sys.path)",
      "for path in sys.argv[1:]:",  # each file on its own: none may rely on another's sys.path
      "  sys.path[:] = original",
      "  for name in [m for m in sys.modules if m == 'configs' or m.startswith('configs.')]:",
      "    del sys.modules[name]",
      "  flags.FLAGS.unparse_flags()",
      "  flags.FLAGS(['main', '--config=' + path + ':runlocal'])",
      "  print(flags.FLAGS.config.model_name)",
    ]
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # `configs` not importable
  result = subprocess.run(
    [sys.executable, "-c", script, *map(os.path.abspath, CONFIG_FILES)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(result.stdout.split()) == len(CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_has_the_common_fields_and_is_locked(path):
  config = load_config(path)
  for key in (
    "dataset",
    "batch_size",
    "total_steps",
    "seed",
    "log_every_steps",
    "eval_every_steps",
    "checkpoint_every_steps",
  ):
    assert key in config, key
  with pytest.raises(AttributeError):
    config.no_such_key = 1


def test_recipes_have_the_papers_settings():
  imagenet = load_config(os.path.join(os.path.dirname(CONFIG_FILES[0]), "imagenet.py"))
  assert (
    imagenet.optimizer.name,
    imagenet.lr.base,
    imagenet.lr.decay_rate,
    imagenet.lr.decay_every_epochs,
    imagenet.weight_decay,
    imagenet.model.dropout_rate,
  ) == ("sgd", 0.045, 0.94, 2.0, 1e-5, 0.5)
  inception = load_config(
    os.path.join(os.path.dirname(CONFIG_FILES[0]), "inception_v3_imagenet.py")
  )
  assert (inception.model_name, inception.weight_decay) == ("inception_v3", 4e-5)
  jft = load_config(os.path.join(os.path.dirname(CONFIG_FILES[0]), "jft_like.py"), "fc")
  assert (
    jft.optimizer.name,
    jft.lr.base,
    jft.lr.decay_rate,
    jft.lr.decay_every_samples,
    jft.loss,
    tuple(jft.model.fc_layers),
    jft.dataset,
  ) == ("rmsprop_tf", 0.001, 0.9, 3_000_000, "sigmoid", (4096, 4096), "open_images_v4")


# Slow-marked runlocal runs (`python -m pytest -q -m slow tests/test_configs.py` runs them):
# Inception V3's (about 57 s of compiling on 2 cores; its training step is covered in the default
# run by tests/test_inception_v3.py's tiny variant) and imagenet.py's (27-45 s; the same
# xception_tiny step as quickstart.py's with the staircase decay and dropout, which
# tests/test_train.py's runs use; its settings are checked above).
_SLOW_RUNLOCAL = {"inception_v3_imagenet.py", "imagenet.py"}


@pytest.mark.parametrize(
  "path",
  [
    pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in _SLOW_RUNLOCAL else p
    for p in RUNLOCAL_FILES
  ],
  ids=os.path.basename,
)
def test_runlocal_runs_two_steps(path, tmp_path):
  config = load_config(path, "runlocal")
  config.total_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.batch_size = 16
  config.eval_batch_size = 200  # few eval batches: this test is about building and running
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == 2
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in l for l in lines)
  assert any(k.startswith("eval/") for l in lines for k in l)
