"""The optimizer chain, schedules and EMA against the recipes' numbers and TensorFlow's formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from xception_jax import optim

IMAGENET_TRAIN_IMAGES = 1_281_167


def imagenet_config(batch_size=32):
  c = base_config()
  c.batch_size = batch_size
  c.optimizer.name = "sgd"
  c.lr.base, c.lr.decay_rate, c.lr.decay_every_epochs, c.lr.staircase = 0.045, 0.94, 2.0, True
  return c


def jft_config(batch_size=32):
  c = base_config()
  c.batch_size = batch_size
  c.optimizer.name = "rmsprop_tf"
  c.lr.base, c.lr.decay_rate, c.lr.decay_every_samples = 0.001, 0.9, 3_000_000
  return c


def constant_lr_config(name, lr=0.1, momentum=0.9, **optimizer):
  c = base_config()
  c.optimizer.name = name
  c.optimizer.momentum = momentum
  c.optimizer.update(optimizer)
  c.lr.schedule, c.lr.base = "constant", lr
  return c


def run_updates(tx, params, grads_list):
  """Applies the gradients one after the other (as a jitted step would); returns params per step."""
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads_list:
    updates, state = update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    history.append(params)
  return history


# ----------------------------------------------------------------------------- schedules


def test_imagenet_schedule_staircase_every_two_epochs():
  c = imagenet_config(batch_size=32)
  steps_per_epoch = IMAGENET_TRAIN_IMAGES / 32  # 40,036.47: two epochs = 80,072.94 steps
  sched = optim.learning_rate_schedule(c, steps_per_epoch, total_steps=10**7)
  cases = {
      0: 0.045,
      80_072: 0.045,  # epoch 1.99999
      80_073: 0.045 * 0.94,  # epoch 2.00001
      5 * 40_037: 0.045 * 0.94**2,  # epoch 5.00009 -> floor(2.5) = 2
      100 * 40_037: 0.045 * 0.94**50,  # epoch 100.0009
  }
  for step, want in cases.items():
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, err_msg=f"step {step}")
  # And as a jitted function of an int32 step array, as optax calls it.
  steps = jnp.array(list(cases), jnp.int32)
  np.testing.assert_allclose(jax.jit(sched)(steps), list(cases.values()), rtol=1e-6)


def test_imagenet_schedule_smooth():
  c = imagenet_config(batch_size=64)
  c.lr.staircase = False
  spe = IMAGENET_TRAIN_IMAGES / 64
  sched = optim.learning_rate_schedule(c, spe, total_steps=10**6)
  for epoch in (0.5, 1.0, 3.7):
    step = round(epoch * spe)
    np.testing.assert_allclose(float(sched(step)), 0.045 * 0.94 ** (step / (2 * spe)), rtol=1e-5)


def test_jft_schedule_decays_every_three_million_samples():
  c = jft_config(batch_size=32)  # 3e6 / 32 = 93,750 steps between decays
  sched = optim.learning_rate_schedule(c, steps_per_epoch=0.0, total_steps=10**7)
  for step, want in {0: 1e-3, 93_749: 1e-3, 93_750: 9e-4, 10 * 93_750 + 5: 1e-3 * 0.9**10}.items():
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-6, err_msg=f"step {step}")
  # batch_size override that does not divide 3e6: the decay stays at 3e6 samples (1,464.84 steps).
  c = jft_config(batch_size=2048)
  sched = optim.learning_rate_schedule(c, steps_per_epoch=0.0, total_steps=10**6)
  np.testing.assert_allclose(float(sched(1464)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(1465)), 9e-4, rtol=1e-6)


def test_lr_scaling_with_batch_size_override_stays_consistent():
  """tensorflow/tpu Inception: 0.165 * batch / 256, x0.94 every 3 epochs; the decay epochs hold."""
  def schedule_for(batch):
    c = base_config()
    c.batch_size = batch
    c.lr.base, c.lr.reference_batch_size, c.lr.decay_every_epochs = 0.165, 256, 3.0
    return optim.learning_rate_schedule(c, IMAGENET_TRAIN_IMAGES / batch, total_steps=10**6)

  for batch in (1024, 512):
    sched = schedule_for(batch)
    peak = 0.165 * batch / 256
    np.testing.assert_allclose(float(sched(0)), peak, rtol=1e-6)
    step_at_epoch = lambda e: int(e * IMAGENET_TRAIN_IMAGES / batch)  # noqa: E731
    np.testing.assert_allclose(float(sched(step_at_epoch(2.9))), peak, rtol=1e-6)
    np.testing.assert_allclose(float(sched(step_at_epoch(3.1))), peak * 0.94, rtol=1e-6)
    np.testing.assert_allclose(float(sched(step_at_epoch(7.0))), peak * 0.94**2, rtol=1e-6)


def test_warmup_then_exponential_decay_counted_from_step_zero():
  c = imagenet_config(batch_size=32)
  c.lr.warmup_epochs = 1.0
  spe = 1000.0
  sched = optim.learning_rate_schedule(c, spe, total_steps=10**5)
  np.testing.assert_allclose(float(sched(0)), 0.0)
  np.testing.assert_allclose(float(sched(250)), 0.045 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(sched(1000)), 0.045, rtol=1e-6)
  np.testing.assert_allclose(float(sched(2000)), 0.045 * 0.94, rtol=1e-6)


def test_constant_and_cosine_schedules():
  c = base_config()
  c.lr.schedule, c.lr.base = "constant", 0.3
  sched = optim.learning_rate_schedule(c, 100.0, total_steps=1000)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 999, 5000)], [0.3] * 3, rtol=1e-6)

  c.lr.schedule, c.lr.warmup_epochs = "cosine", 1.0  # 100 warmup steps, cosine over 100..1100
  sched = optim.learning_rate_schedule(c, 100.0, total_steps=1100)
  np.testing.assert_allclose(float(sched(50)), 0.15, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 0.3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(600)), 0.15, rtol=1e-5)
  np.testing.assert_allclose(float(sched(350)), 0.3 * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-5)
  np.testing.assert_allclose(float(sched(1100)), 0.0, atol=1e-7)

  c.lr.warmup_steps = 20  # overrides warmup_epochs: 20 warmup steps, cosine over 20..1100
  sched = optim.learning_rate_schedule(c, 100.0, total_steps=1100)
  np.testing.assert_allclose(float(sched(10)), 0.15, rtol=1e-6)
  np.testing.assert_allclose(float(sched(560)), 0.15, rtol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("optimizer.name", "adam", "config.optimizer.name='adam'.*sgd.*rmsprop_tf.*rmsprop_keras"),
    ("lr.schedule", "linear", "config.lr.schedule='linear'.*exponential.*constant.*cosine"),
    ("weight_decay_on", "biases", "config.weight_decay_on='biases'.*kernels.*all"),
    ("optimizer.momentum", 1.0, "config.optimizer.momentum"),
    ("optimizer.eps", 0.0, "config.optimizer.eps"),
    ("lr.decay_every_epochs", 0.0, "config.lr.decay_every_epochs"),
    ("ema.decay", 1.0, "config.ema.decay"),
    ("batch_size", 0, "config.batch_size"),
])
def test_bad_config_raises_naming_the_key(key, value, message):
  c = base_config()
  c.optimizer.name = "rmsprop_tf"
  section, _, field = key.rpartition(".")
  setattr(c[section] if section else c, field, value)
  with pytest.raises(ValueError, match=message):
    optim.create_optimizer(c, steps_per_epoch=100.0, total_steps=1000)


def test_cosine_needs_total_steps():
  c = base_config()
  c.lr.schedule = "cosine"
  with pytest.raises(ValueError, match="total_steps"):
    optim.learning_rate_schedule(c, 100.0, total_steps=0)


# ----------------------------------------------------------------------------- update rules

GRADS = [np.array([0.5, -1.0]), np.array([0.1, 0.3]), np.array([-0.2, 0.4])]
W0 = np.array([1.0, -2.0])


def tf1_rmsprop_numpy(lr, rho, momentum, eps, ms0):
  """tf.compat.v1.train.RMSPropOptimizer (ApplyRMSProp kernel), written out in float64."""
  w, ms, mom, out = W0.copy(), np.full(2, ms0), np.zeros(2), []
  for g in GRADS:
    ms = rho * ms + (1 - rho) * g**2
    mom = momentum * mom + lr * g / np.sqrt(ms + eps)
    w = w - mom
    out.append(w)
  return out


def test_rmsprop_tf_matches_tf1_formula_by_hand():
  c = constant_lr_config("rmsprop_tf", lr=0.1, momentum=0.9, rms_decay=0.9, eps=1.0)
  tx, _ = optim.create_optimizer(c, 100.0, 1000)
  got = run_updates(tx, jnp.asarray(W0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  # Step 1 by hand: ms = 0.9 * 1 + 0.1 * g^2 = [0.925, 1.0]; mom = 0.1 * g / sqrt(ms + 1).
  np.testing.assert_allclose(got[0], [1 - 0.05 / math.sqrt(1.925), -2 + 0.1 / math.sqrt(2.0)],
                             rtol=1e-6)
  want = tf1_rmsprop_numpy(lr=0.1, rho=0.9, momentum=0.9, eps=1.0, ms0=1.0)
  for step, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=f"step {step + 1}")


def test_rmsprop_keras_starts_mean_square_at_zero():
  c = constant_lr_config("rmsprop_keras", lr=0.1, momentum=0.9, rms_decay=0.9, eps=1e-3)
  tx, _ = optim.create_optimizer(c, 100.0, 1000)
  got = run_updates(tx, jnp.asarray(W0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  # Step 1 by hand: ms = 0.1 * g^2, so |step| = 0.1 * |g| / sqrt(0.1 g^2 + 1e-3) ~ 0.1 / sqrt(0.1).
  np.testing.assert_allclose(got[0][0], 1 - 0.05 / math.sqrt(0.025 + 1e-3), rtol=1e-6)
  want = tf1_rmsprop_numpy(lr=0.1, rho=0.9, momentum=0.9, eps=1e-3, ms0=0.0)
  for step, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, err_msg=f"step {step + 1}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_tf1_formula_with_changing_lr(nesterov):
  # decay_every_samples == batch_size: lr halves every step, lr_t = 0.1 * 0.5^t for update t = 0, 1, 2.
  c = base_config()
  c.optimizer.name, c.optimizer.momentum, c.optimizer.nesterov = "sgd", 0.9, nesterov
  c.lr.base, c.lr.decay_rate, c.lr.decay_every_samples = 0.1, 0.5, c.batch_size
  tx, sched = optim.create_optimizer(c, 100.0, 1000)
  got = run_updates(tx, jnp.asarray(W0, jnp.float32), [jnp.asarray(g, jnp.float32) for g in GRADS])
  # tf.compat.v1.train.MomentumOptimizer: accum = m * accum + g; w -= lr * accum
  # (nesterov: w -= lr * (g + m * accum)).
  w, accum = W0.copy(), np.zeros(2)
  for t, g in enumerate(GRADS):
    lr = 0.1 * 0.5**t
    np.testing.assert_allclose(float(sched(t)), lr, rtol=1e-7)
    accum = 0.9 * accum + g
    w = w - lr * (g + 0.9 * accum if nesterov else accum)
    np.testing.assert_allclose(got[t], w, rtol=1e-6, err_msg=f"step {t + 1}")
  if not nesterov:  # step 2 by hand: accum = 0.9 * 0.5 + 0.1 = 0.55, lr 0.05.
    np.testing.assert_allclose(got[1][0], 1 - 0.1 * 0.5 - 0.05 * 0.55, rtol=1e-6)


def test_against_tensorflow_and_keras_optimizers():
  """Cross-check with the real TF1 optimizers and Keras 3's RMSprop (skipped without TF)."""
  tf = pytest.importorskip("tensorflow")

  def tf_run(opt):
    var = tf.Variable(W0.astype(np.float32))
    out = []
    for g in GRADS:
      opt.apply_gradients([(tf.constant(g.astype(np.float32)), var)])
      out.append(var.numpy().copy())
    return out

  cases = [
      ("rmsprop_tf", dict(rms_decay=0.9, eps=1.0), lambda: tf.compat.v1.train.RMSPropOptimizer(
          0.1, decay=0.9, momentum=0.9, epsilon=1.0)),
      ("sgd", dict(), lambda: tf.compat.v1.train.MomentumOptimizer(0.1, 0.9)),
      ("sgd", dict(nesterov=True), lambda: tf.compat.v1.train.MomentumOptimizer(
          0.1, 0.9, use_nesterov=True)),
  ]
  try:
    import keras  # Keras 3 on the TensorFlow backend
    if keras.__version__.startswith("3"):
      cases.append(("rmsprop_keras", dict(rms_decay=0.9, eps=1.0), lambda: keras.optimizers.RMSprop(
          0.1, rho=0.9, momentum=0.9, epsilon=1.0)))
  except ImportError:
    pass
  for name, extra, make_tf in cases:
    c = constant_lr_config(name, lr=0.1, momentum=0.9, **extra)
    tx, _ = optim.create_optimizer(c, 100.0, 1000)
    got = run_updates(tx, jnp.asarray(W0, jnp.float32),
                      [jnp.asarray(g, jnp.float32) for g in GRADS])
    for step, (g, w) in enumerate(zip(got, tf_run(make_tf()))):
      np.testing.assert_allclose(g, w, rtol=1e-5, err_msg=f"{name} {extra} step {step + 1}")


# ----------------------------------------------------------------------------- decay, clipping


def toy_params():
  return {
      "Conv_0": {"kernel": jnp.full((3, 3, 2, 4), 2.0), "bias": jnp.full((4,), 2.0)},
      "BatchNorm_0": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 2.0)},
      "SepConv_0": {"depthwise_kernel": jnp.full((3, 3, 1, 4), 2.0)},
      "Dense_0": {"kernel": jnp.full((4, 5), 2.0), "bias": jnp.full((5,), 2.0)},
  }


@pytest.mark.parametrize("on", ["kernels", "all"])
def test_weight_decay_is_l2_on_kernels_only_by_default(on):
  c = constant_lr_config("sgd", lr=1.0, momentum=0.0)
  c.weight_decay, c.weight_decay_on = 0.1, on
  tx, _ = optim.create_optimizer(c, 100.0, 1000)
  params = toy_params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
  # grad += wd * w = 0.2; SGD with lr 1 moves by -0.2 where decay applies, 0 elsewhere.
  flat = {jax.tree_util.keystr(p): np.asarray(u) for p, u in
          jax.tree_util.tree_leaves_with_path(updates)}
  decayed = {"['Conv_0']['kernel']", "['Dense_0']['kernel']", "['SepConv_0']['depthwise_kernel']"}
  for name, u in flat.items():
    want = -0.2 if (on == "all" or name in decayed) else 0.0
    np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=name)


def test_weight_decay_mask_without_kernels_is_an_error():
  with pytest.raises(ValueError, match="weight_decay_on='kernels'"):
    optim.weight_decay_mask({"BatchNorm_0": {"scale": jnp.ones(3)}}, "kernels")


def test_global_norm_clipping():
  c = constant_lr_config("sgd", lr=1.0, momentum=0.0, grad_clip_norm=1.0)
  tx, _ = optim.create_optimizer(c, 100.0, 1000)
  params = {"a": {"kernel": jnp.zeros(1)}, "b": {"kernel": jnp.zeros(1)}}
  state = tx.init(params)
  big = {"a": {"kernel": jnp.array([3.0])}, "b": {"kernel": jnp.array([4.0])}}  # global norm 5
  updates, state = tx.update(big, state, params)
  np.testing.assert_allclose([updates["a"]["kernel"][0], updates["b"]["kernel"][0]], [-0.6, -0.8],
                             rtol=1e-6)
  small = jax.tree.map(lambda g: g / 10, big)  # norm 0.5: untouched
  updates, _ = tx.update(small, state, params)
  np.testing.assert_allclose([updates["a"]["kernel"][0], updates["b"]["kernel"][0]], [-0.3, -0.4],
                             rtol=1e-6)


# ----------------------------------------------------------------------------- EMA


def test_ema_decay_with_and_without_num_updates_warmup():
  c = base_config()
  c.ema.decay = 0.9999
  np.testing.assert_allclose(float(optim.ema_decay(0, c)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(optim.ema_decay(1, c)), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(optim.ema_decay(1000, c)), 1001 / 1010, rtol=1e-6)
  np.testing.assert_allclose(float(optim.ema_decay(10**6, c)), 0.9999, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(lambda s: optim.ema_decay(s, c))(jnp.int32(8))),
                             9 / 18, rtol=1e-6)
  c.ema.num_updates_warmup = False
  np.testing.assert_allclose(float(optim.ema_decay(0, c)), 0.9999, rtol=1e-6)


def test_ema_update_params_and_batch_stats():
  c = base_config()
  c.ema.decay = 0.5
  ema = {"params": {"kernel": jnp.array([1.0, 2.0])},
         "batch_stats": {"mean": jnp.array([0.0]), "var": jnp.array([1.0], jnp.bfloat16)}}
  update = jax.jit(optim.ema_update)
  values = [{"params": {"kernel": jnp.array([3.0, 2.0])},
             "batch_stats": {"mean": jnp.array([4.0]), "var": jnp.array([3.0], jnp.bfloat16)}}] * 2
  want_kernel, want_mean, want_var = np.array([1.0, 2.0]), 0.0, 1.0
  for t, v in enumerate(values, start=1):
    d = float(optim.ema_decay(t, c))  # min(0.5, 2/11) then min(0.5, 3/12)
    ema = update(ema, v, optim.ema_decay(t, c))
    want_kernel = want_kernel - (1 - d) * (want_kernel - np.array([3.0, 2.0]))
    want_mean = want_mean - (1 - d) * (want_mean - 4.0)
    want_var = want_var - (1 - d) * (want_var - 3.0)
  np.testing.assert_allclose(ema["params"]["kernel"], want_kernel, rtol=1e-6)
  np.testing.assert_allclose(ema["batch_stats"]["mean"], [want_mean], rtol=1e-6)
  assert ema["batch_stats"]["var"].dtype == jnp.bfloat16
  np.testing.assert_allclose(ema["batch_stats"]["var"].astype(np.float32), [want_var], rtol=1e-2)
  # decay 0 (EMA off) copies the new values.
  copied = optim.ema_update(ema, values[0], 0.0)
  np.testing.assert_allclose(copied["params"]["kernel"], [3.0, 2.0])
