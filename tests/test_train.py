"""The training job: sharded step == single device, grad accumulation, exact resume, NaN guard."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import quickstart
from xception_jax import checkpointing
from xception_jax import config_check
from xception_jax import data
from xception_jax import models
from xception_jax import optim
from xception_jax import steps
from xception_jax import train


def tiny_config(**overrides):
  c = quickstart.get_config("runlocal")
  c.unlock()
  c.batch_size = 16
  c.eval_batch_size = 200
  # A staircase decay every 2 steps: the learning rate still changes along a run (what resuming
  # must restore), and unlike the quickstart's cosine it does not depend on total_steps, so the
  # tests of 1, 6 and 10 steps share one compiled training step (tests/conftest.py's cache).
  c.lr.schedule = "exponential"
  c.lr.staircase = True
  c.lr.decay_every_samples = 32
  c.lr.decay_rate = 0.5
  c.model.dropout_rate = 0.5  # the ImageNet recipe's: its per-step keys are part of what's tested
  c.total_steps = 4
  c.log_every_steps = 1
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  for k, v in overrides.items():
    c[k] = v
  return c


def _mesh(devices):
  return Mesh(
    np.array(devices).reshape(-1, 1),
    ("data", "model"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def _one_step(config, devices, batch):
  model = models.create_model(config, num_classes=10)
  tx, schedule = optim.create_optimizer(config, 100.0, 100)
  mesh = _mesh(devices)
  state, shardings = steps.create_train_state(model, tx, config.image_size, mesh, config.seed)
  step = steps.jit_train_step(
    steps.make_train_step(
      config, model, tx, schedule, steps.make_loss_fn("softmax", 10, 0.0), False
    ),
    shardings,
    mesh,
  )
  state, metrics = step(state, data.to_global(batch, NamedSharding(mesh, P("data"))))
  return jax.device_get(state), jax.device_get(metrics)


def _random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  size = config.image_size
  return {
    "image": rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32),
    "label": rng.integers(0, 10, config.batch_size).astype(np.int32),
  }


def test_sharded_step_over_8_devices_matches_one_device():
  assert jax.device_count() == 8
  config = tiny_config()
  batch = _random_batch(config)
  state8, m8 = _one_step(config, jax.devices(), batch)
  state1, m1 = _one_step(config, jax.devices()[:1], batch)
  np.testing.assert_allclose(m8["train/loss"], m1["train/loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state8.batch_stats), jax.tree.leaves(state1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_averages_micro_batch_gradients():
  """accum=2 takes one optimizer step with the mean of the two micro-batches' gradients."""
  config = tiny_config()
  config.optimizer.momentum = 0.0
  config.weight_decay = 0.0
  config.lr.schedule = "constant"
  config.lr.warmup_epochs = 0.0
  batch = _random_batch(config)
  config.grad_accum_steps = 2
  # One device, as the reference below: the network is piecewise smooth (max pool, ReLU), and over
  # 8 devices the float sums run in another order, which can flip a near-tie of a max pool and
  # reroute a gradient (on one micro-batch here, a 1e-6 relative input perturbation moves the
  # gradient by about 1%). Sharded equals single-device is the test above.
  state_accum, _ = _one_step(config, jax.devices()[:1], batch)

  # The same by hand: micro-batch i holds rows i, i+2, ... ; BN statistics per micro-batch.
  model = models.create_model(config, num_classes=10)
  tx, _ = optim.create_optimizer(config, 100.0, 100)
  state, _ = steps.create_train_state(
    model, tx, config.image_size, _mesh(jax.devices()[:1]), config.seed
  )
  loss_fn = steps.make_loss_fn("softmax", 10, 0.0)
  base_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)

  def micro_loss(params, batch_stats, index, images, labels):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": batch_stats},
      images,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.fold_in(base_rng, index)},
    )
    return jnp.mean(loss_fn(logits, labels)), mutated["batch_stats"]

  micro_grad = jax.jit(jax.grad(micro_loss, has_aux=True))  # one compile for both micro-batches
  micro = [(i, batch["image"][i::2], batch["label"][i::2]) for i in range(2)]
  g0, stats0 = micro_grad(state.params, state.batch_stats, *micro[0])
  g1, stats1 = micro_grad(state.params, stats0, *micro[1])
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  updates, _ = tx.update(mean_grads, state.opt_state, state.params)
  expected = jax.tree.map(jnp.add, state.params, updates)
  # Tolerance: BN's one-pass variance over 8-example micro-batches is sensitive to op order;
  # a wrong split or a sum instead of a mean gives differences of order 100%, not 1e-5.
  for a, b in zip(jax.tree.leaves(state_accum.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5)
  for a, b in zip(jax.tree.leaves(state_accum.batch_stats), jax.tree.leaves(stats1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_invalid_batch_size_fails_before_compile_naming_the_key():
  config = tiny_config(batch_size=12)  # not a multiple of the 8 devices
  with pytest.raises(ValueError, match=r"config\.batch_size.*multiples of 8"):
    config_check.validate(config, num_data_devices=8, process_count=1)
  config = tiny_config(dtype="float16")
  with pytest.raises(ValueError, match=r"config\.dtype"):
    config_check.validate(config, num_data_devices=8, process_count=1)


def _all_arrays(workdir):
  state, step = checkpointing.read_state(workdir)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def test_resume_after_sigterm_is_exact(tmp_path):
  config = tiny_config(total_steps=10)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  assert full["step"] == 10 and not full["preempted"]

  interrupted_dir = tmp_path / "interrupted"
  metrics_file = interrupted_dir / "metrics.jsonl"

  def send_sigterm_after_step_2():
    deadline = time.time() + 300
    while time.time() < deadline:
      if metrics_file.exists() and any(
        json.loads(l)["step"] >= 2 for l in metrics_file.read_text().splitlines()
      ):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  killer = threading.Thread(target=send_sigterm_after_step_2)
  killer.start()
  first = train.train_and_evaluate(config, str(interrupted_dir))
  killer.join()
  assert first["preempted"] and 2 <= first["step"] < 10, first
  assert checkpointing.read_state(str(interrupted_dir))[1] == first["step"]

  second = train.train_and_evaluate(config, str(interrupted_dir))
  assert second["step"] == 10 and not second["preempted"]
  step_a, arrays_a = _all_arrays(str(tmp_path / "full"))
  step_b, arrays_b = _all_arrays(str(interrupted_dir))
  assert step_a == step_b == 10
  assert arrays_a.keys() == arrays_b.keys()
  for key in arrays_a:
    np.testing.assert_array_equal(arrays_a[key], arrays_b[key], err_msg=key)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(total_steps=6, checkpoint_every_steps=2, log_every_steps=1)
  real_iterator = data.create_train_iterator

  def poisoned(config, info, start_step=0, **kwargs):
    for step, batch in enumerate(
      real_iterator(config, info, start_step=start_step, **kwargs), start=start_step
    ):
      if step == 3:  # the 4th step sees a NaN image
        batch = {**batch, "image": np.full(batch["image"].shape, np.nan, np.float32)}
      yield batch

  monkeypatch.setattr(data, "create_train_iterator", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="NaN or Inf"):
    train.train_and_evaluate(config, str(tmp_path))
  step, arrays = _all_arrays(str(tmp_path))
  assert step == 2
  assert all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


def test_init_from_another_run_replaces_the_head_for_a_new_class_count(tmp_path):
  source = tmp_path / "source"
  train.train_and_evaluate(tiny_config(total_steps=1), str(source))
  config = tiny_config(total_steps=1, eval_every_steps=1000, init_from=str(source))
  config.num_classes = 12  # more classes than the data has: a new head
  model = models.create_model(config, num_classes=12)
  tx, _ = optim.create_optimizer(config, 100.0, 100)
  state, _ = steps.create_train_state(
    model, tx, config.image_size, _mesh(jax.devices()[:1]), config.seed
  )
  state = train.load_pretrained(config, model, state)
  # Separate buffers for the weights and their EMA: the train step donates the state, and XLA
  # refuses (or crashes on) the same buffer donated twice.
  pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
  for raw, ema in zip(
    jax.tree.leaves(state.params) + jax.tree.leaves(state.batch_stats),
    jax.tree.leaves(state.ema_params) + jax.tree.leaves(state.ema_batch_stats),
  ):
    assert pointer(raw) != pointer(ema)
  loaded = checkpointing.load_variables(str(source), use_ema=True)
  flat_new = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  flat_old = {
    jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(loaded["params"])[0]
  }
  replaced = []
  for path, value in flat_new:
    key = jax.tree_util.keystr(path)
    if value.shape[-1:] == (12,):
      replaced.append(key)
    else:
      np.testing.assert_array_equal(value, flat_old[key], err_msg=key)
  assert replaced and all("predictions" in k for k in replaced), replaced
