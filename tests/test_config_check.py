"""config_check.validate: every setting checked once, before anything is built, naming the key."""

import pytest

from configs import common
from configs import quickstart
from xception_jax import config_check
from xception_jax import data
from xception_jax import train


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("optimizer.name", "adam", "config.optimizer.name='adam'.*sgd.*rmsprop_tf.*rmsprop_keras"),
    ("lr.schedule", "linear", "config.lr.schedule='linear'.*exponential.*constant.*cosine"),
    ("weight_decay_on", "biases", "config.weight_decay_on='biases'.*kernels.*all"),
    ("optimizer.momentum", 1.0, "config.optimizer.momentum"),
    ("optimizer.eps", 0.0, "config.optimizer.eps"),
    ("lr.decay_every_epochs", 0.0, "config.lr.decay_every_epochs"),
    ("ema.decay", 1.0, "config.ema.decay"),
    ("batch_size", 0, "config.batch_size"),
    ("input.bad_files", "maybe", r"config.input.bad_files='maybe'; valid: \['skip', 'error'\]"),
    ("input.area_range", (0.5, 0.1), "config.input.area_range"),
    ("map_class_weighting", "by_size", "config.map_class_weighting='by_size'"),
    ("loss", "hinge", "config.loss"),
  ],
)
def test_bad_config_raises_naming_the_key(key, value, message):
  c = common.base_config()
  c.optimizer.name = "rmsprop_tf"
  section, _, field = key.rpartition(".")
  setattr(c[section] if section else c, field, value)
  with pytest.raises(ValueError, match=message):
    config_check.validate(c, num_data_devices=1, process_count=1)


def test_every_call_checks_the_config_it_is_given():
  c = common.base_config()
  config_check.validate(c, 1, 1)
  c.optimizer.momentum = 1.0
  with pytest.raises(ValueError, match="config.optimizer.momentum"):
    config_check.validate(c, 1, 1)  # a cached verdict would let this through


def test_eval_batch_size_none_or_zero_is_the_training_batch():
  c = common.base_config()
  c.dataset, c.image_size, c.batch_size = "synthetic", 8, 16
  for unset in (None, 0):
    c.eval_batch_size = unset
    assert data.eval_batch_size(c) == 16
    config_check.validate(c, num_data_devices=8, process_count=1)
    info = data.dataset_info(c)
    batches = data.create_eval_iterator(c, info, process_index=0, process_count=2)
    assert next(iter(batches))["image"].shape[0] == 8  # 16 over two processes
  c.eval_batch_size = -8
  with pytest.raises(ValueError, match="config.eval_batch_size"):
    config_check.validate(c, num_data_devices=8, process_count=1)


def test_train_and_evaluate_validates_once_before_reading_data(tmp_path, monkeypatch):
  calls = []
  real = config_check.validate

  def counting(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  class Stop(Exception):
    pass

  def stop(config):
    raise Stop(len(calls))

  monkeypatch.setattr(config_check, "validate", counting)
  monkeypatch.setattr(data, "dataset_info", stop)
  with pytest.raises(Stop) as stopped:
    train.train_and_evaluate(quickstart.get_config("runlocal"), str(tmp_path / "run"))
  assert stopped.value.args == (1,)
  assert not (tmp_path / "run").exists()  # nothing written before the check


def test_training_dtypes_come_from_the_models_list():
  assert config_check.TRAIN_DTYPES == ("float32", "bfloat16")
