"""The Xception module: the paper's counts, the init/apply contract, where every ReLU and shortcut
sits, the head knobs, bf16 compute, the registry and the budget solver.

Most tests fill `jax.eval_shape(model.init)` with NumPy-random values instead of calling
`model.init`: compiling jax's random number generators for every kernel takes far longer on a
2-core CPU than the forward pass itself. One test runs the real `init` for the contract.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import models
from xception_jax.models import budget as budget_lib
from xception_jax.models import costs
from xception_jax.models import head
from xception_jax.models import layers
from xception_jax.models import xception_arch
from xception_jax.models import xception_costs


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _shapes(model, size=(71, 71)):
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, *size, 3), jnp.float32),
  )


def _random_variables(model, size=(80, 80), seed=0):
  """Variables with the model's shapes: fan-in scaled kernels, random BN affine and statistics."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "var":
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:  # bias, mean
      value = rng.normal(scale=0.1, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, size))


def _images(size=(80, 80), batch=2, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).uniform(-1, 1, size=(batch, *size, 3)), jnp.float32
  )


def _record(model, variables, images, **kwargs):
  """Runs the model (jitted) and records every submodule call: path -> (first input, output)."""

  def run(variables, images, rngs):
    calls = {}

    def interceptor(next_fun, args, kw, context):
      out = next_fun(*args, **kw)
      if context.method_name == "__call__" and context.module.scope is not None:
        calls["/".join(context.module.scope.path)] = (args[0] if args else None, out)
      return out

    with nn.intercept_methods(interceptor):
      out = model.apply(variables, images, rngs=rngs, **kwargs)
    return out, calls

  rngs = kwargs.pop("rngs", None)
  return jax.jit(run)(variables, images, rngs)


def test_reference_counts_match_the_paper_and_keras():
  """Paper table 3 / Keras: 22,855,952 trainable, 54,528 batch statistics; no top: 20,806,952."""
  shapes = _shapes(models.create("xception"), (299, 299))
  assert set(shapes) == {"params", "batch_stats"}
  assert _count(shapes["params"]) == 22_855_952
  assert _count(shapes["batch_stats"]) == 54_528
  assert _count(_shapes(models.create("xception", num_classes=0), (299, 299))["params"]) == (
    20_806_952
  )
  cost = costs.model_cost("xception")
  assert (cost.params, cost.batch_stat_entries) == (22_855_952, 54_528)
  # Only the classifier has a bias; BN has scale and bias; every other leaf is a kernel.
  leaves = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  biased = {path[0].key for path, _ in leaves if path[-1].key == "bias"}
  assert biased == {"predictions"} | {p[0].key for p, _ in leaves if p[0].key.endswith("_bn")}
  assert shapes["params"]["block2_sepconv1"]["spatial"]["kernel"].shape == (3, 3, 1, 64)
  assert shapes["params"]["block2_sepconv1"]["pointwise"]["kernel"].shape == (1, 1, 64, 128)
  assert shapes["params"]["block13_shortcut"]["kernel"].shape == (1, 1, 728, 1024)
  assert shapes["params"]["predictions"]["kernel"].shape == (2048, 1000)


def test_init_apply_contract():
  model = models.create("xception_tiny", num_classes=5, dropout_rate=0.5)
  images = _images((80, 80), batch=4)
  # Jitted: eagerly, init compiles each initializer and op on its own (about 20 s here).
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images)
  assert set(variables) == {"params", "batch_stats"}
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  assert logits.shape == (4, 5) and logits.dtype == jnp.float32

  train_step = jax.jit(
    lambda v, x, key: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
  )
  train_logits, updates = train_step(variables, images, jax.random.key(1))
  assert train_logits.shape == (4, 5)
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
  )
  assert all(jax.tree.leaves(moved)), "every batch-norm statistic should move in training"
  other_key = train_step(variables, images, jax.random.key(2))[0]
  assert not np.allclose(train_logits, other_key), "dropout should depend on the rng"


def test_headless_returns_the_feature_map_at_any_size():
  model = models.create("xception_tiny", num_classes=0)
  variables = _random_variables(model, (71, 96))
  features = jax.jit(functools.partial(model.apply, train=False))(variables, _images((71, 96)))
  # 71 -> 35 -> 33 -> 17 -> 9 -> 5 -> 3 and 96 -> 47 -> 45 -> 23 -> 12 -> 6 -> 3.
  assert features.shape == (2, 3, 3, model.architecture().width("exit3"))
  assert features.dtype == jnp.float32
  assert float(features.min()) >= 0.0, "the feature map comes after the final ReLU"
  assert "predictions" not in variables["params"]


def test_input_smaller_than_71_fails_before_compiling():
  model = models.create("xception_tiny")
  with pytest.raises(ValueError, match=r"at least 71x71 pixels, got 70x80"):
    _shapes(model, (70, 80))
  with pytest.raises(ValueError, match=r"images of shape \[batch, height, width, channels\]"):
    jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((80, 80, 3))
    )


@pytest.mark.parametrize("residual", [True, False])
def test_relus_and_shortcuts_sit_where_keras_puts_them(residual):
  """Probes the inputs of separable layers against the batch-norm outputs before them."""
  model = models.create("xception_tiny", num_middle_blocks=2, num_classes=0, residual=residual)
  variables = _random_variables(model)
  features, calls = _record(model, variables, _images(), train=False)
  out = lambda name: calls[name][1]
  into = lambda name: calls[name][0]
  pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)

  # block2 has no leading ReLU of its own: its input is the stem's ReLU output.
  close(into("block2_sepconv1"), jax.nn.relu(out("block1_conv2_bn")))
  close(into("block2_sepconv2"), jax.nn.relu(out("block2_sepconv1_bn")))
  # Entry block output (pre-activation) = pool(BN) + 1x1 strided shortcut; the next block ReLUs it.
  x3 = pool(out("block2_sepconv2_bn"))
  x5 = pool(out("block4_sepconv2_bn"))
  if residual:
    x3 = x3 + out("block2_shortcut_bn")
    x5 = x5 + out("block4_shortcut_bn")
    close(into("block2_shortcut"), into("block2_sepconv1"))
  else:
    assert not any("shortcut" in name for name in variables["params"])
  close(into("block3_sepconv1"), jax.nn.relu(x3))
  close(into("block5_sepconv1"), jax.nn.relu(x5))
  # Middle block: identity shortcut around three (ReLU, SepConv, BN).
  close(into("block5_sepconv2"), jax.nn.relu(out("block5_sepconv1_bn")))
  x6 = out("block5_sepconv3_bn") + (x5 if residual else 0.0)
  close(into("block6_sepconv1"), jax.nn.relu(x6))
  # Exit: the last two separable layers have their ReLU after the BN, and it ends the network.
  close(into("block8_sepconv2"), jax.nn.relu(out("block8_sepconv1_bn")))
  close(features, jax.nn.relu(out("block8_sepconv2_bn")))
  # No activation inside a separable layer by default (Keras SeparableConv2D).
  close(into("block5_sepconv1/pointwise"), out("block5_sepconv1/spatial"))
  # Batch norm with the Keras epsilon (1e-3), from the moving statistics in eval mode.
  bn = variables["params"]["block5_sepconv1_bn"], variables["batch_stats"]["block5_sepconv1_bn"]
  x = into("block5_sepconv1_bn")
  close(
    out("block5_sepconv1_bn"),
    (x - bn[1]["mean"]) / np.sqrt(bn[1]["var"] + 1e-3) * bn[0]["scale"] + bn[0]["bias"],
  )
  assert layers.BatchNorm().momentum == 0.99


def test_fc_layers_and_dropout_sit_before_the_classifier():
  model = models.create("xception_tiny", num_classes=3, fc_layers=(32, 16), dropout_rate=0.5)
  variables = _random_variables(model)
  assert variables["params"]["fc1"]["kernel"].shape == (256, 32)
  assert variables["params"]["fc2"]["kernel"].shape == (32, 16)
  assert variables["params"]["predictions"]["kernel"].shape == (16, 3)
  _, calls = _record(
    model,
    variables,
    _images(),
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": jax.random.key(0)},
  )
  fc2_in, fc2_out = calls["fc2"]
  np.testing.assert_allclose(fc2_in, jax.nn.relu(calls["fc1"][1]), rtol=1e-6)
  dropout_in, dropout_out = calls["Dropout_0"]
  np.testing.assert_allclose(dropout_in, jax.nn.relu(fc2_out), rtol=1e-6)
  kept = np.asarray(dropout_out) != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(
    np.asarray(dropout_out)[kept], np.asarray(dropout_in)[kept] * 2, rtol=1e-6
  )
  np.testing.assert_array_equal(calls["predictions"][0], dropout_out)
  # In eval mode dropout is the identity.
  _, eval_calls = _record(model, variables, _images(), train=False)
  np.testing.assert_array_equal(*eval_calls["Dropout_0"])


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  model = models.create("xception_tiny", num_classes=4, dtype="bfloat16")
  shapes = _shapes(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  variables = _random_variables(model)
  logits, calls = _record(model, variables, _images(), train=False)
  assert logits.dtype == jnp.float32
  assert calls["block5_sepconv1/spatial"][1].dtype == jnp.bfloat16
  assert calls["block5_sepconv1_bn"][1].dtype == jnp.bfloat16
  reference = jax.jit(
    functools.partial(models.create("xception_tiny", num_classes=4).apply, train=False)
  )(variables, _images())
  np.testing.assert_allclose(
    logits, reference, rtol=0.1, atol=0.1 * float(jnp.abs(reference).max())
  )


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(residual=False, num_middle_blocks=0),
    dict(fc_layers=(16, 8), segments=2, order="pointwise_first"),
    dict(num_classes=0, fc_layers=(16,)),
  ],
)
def test_the_description_names_every_variable_of_the_module(kwargs):
  """Walking xception_arch's description (stem, blocks) and the head yields exactly the module's
  variables, with the widths of the slots each layer maps between."""
  model = models.create("xception_tiny", **kwargs)
  arch = model.architecture()
  variables = _shapes(model)
  params = variables["params"]
  convs = [(conv.name, conv.out_slot) for conv in xception_arch.STEM]  # (name, output slot)
  separables = []
  for block in xception_arch.blocks(arch.num_middle_blocks):
    separables += block.layers
    if arch.shortcut(block) == "conv":
      convs.append((block.shortcut_name, block.out_slot))
      assert params[block.shortcut_name]["kernel"].shape[:2] == (1, 1)
  for name, slot in convs:
    assert params[name]["kernel"].shape[-1] == arch.width(slot)
  for layer in separables:
    assert params[layer.name]["pointwise"]["kernel"].shape == (
      1,
      1,
      arch.width(layer.in_slot),
      arch.width(layer.out_slot),
    )
  assert [layer.name for layer in separables] == [name for name, _ in arch.layer_segments]
  body = [name for name, _ in convs] + [layer.name for layer in separables]
  norms = {xception_arch.bn_name(name) for name in body}
  classifier = [head.fc_name(i) for i in range(len(arch.fc_layers))] + [head.CLASSIFIER_NAME]
  assert set(params) == {*body, *norms, *(classifier if arch.num_classes else ())}
  assert set(variables["batch_stats"]) == norms


def test_width_multiplier_and_middle_blocks_shape_the_network():
  tiny = models.create("xception_tiny").architecture()
  assert tiny.widths == (8, 8, 16, 32, 88, 128, 192, 256) and tiny.num_middle_blocks == 1
  small = models.create("xception_small").architecture()
  assert all(w % 8 == 0 for w in small.widths)
  params = _shapes(models.create("xception", num_middle_blocks=2, width_multiplier=0.5))["params"]
  assert "block6_sepconv3" in params and "block7_sepconv1" in params  # exit renumbered
  assert "block8_sepconv2" in params and "block9_sepconv1" not in params
  # 728 * 0.5 = 364 rounds to the nearest multiple of 8, 368.
  assert params["block5_sepconv1"]["pointwise"]["kernel"].shape == (1, 1, 368, 368)


def test_registry_names_and_errors():
  assert {
    "xception",
    "xception_small",
    "xception_tiny",
    "inception_v3",
    "inception_v3_tiny",
  } <= set(models.list_models())
  with pytest.raises(ValueError, match=r"Unknown model 'xceptoin'; known models: .*xception_tiny"):
    models.create("xceptoin")
  with pytest.raises(
    ValueError, match=r"unknown keyword argument\(s\) \['segment'\]; valid: .*segments"
  ):
    models.create("xception_tiny", segment=4)
  # Registry defaults are overridable; dicts from configs make hashable modules.
  model = models.create("xception_tiny", num_middle_blocks=2, segments={"middle": 4})
  assert model.architecture().num_middle_blocks == 2 and hash(model) == hash(model.clone())


def test_validation_does_not_depend_on_what_was_cached():
  """1 == True: a cache keyed on raw settings let residual=1 through after residual=True."""
  models.create("xception_tiny", residual=True, segments=1)
  with pytest.raises(ValueError, match="residual must be True or False, got 1"):
    models.create("xception_tiny", residual=1, segments=1)
  with pytest.raises(ValueError, match="segments=True is not valid"):
    models.create("xception_tiny", segments=True)


@pytest.mark.parametrize(
  "setting",
  [
    dict(segments=1),
    dict(segments=4),
    dict(group_width=16),
    dict(segments={"entry": 2, "middle": 7}),
    dict(segments=2, order="pointwise_first"),
  ],
)
def test_budget_solver_matches_xception_params_within_one_percent(setting):
  model = models.create("xception", budget="params", **setting)
  arch = model.architecture()
  counted = _count(_shapes(model)["params"])
  assert counted == costs.model_cost("xception", budget="params", **setting).params
  # The target is the same configuration with depthwise separable layers: Xception itself here,
  # and its pointwise-first twin (9 * (N - M) weights more per layer) for pointwise_first.
  reference = costs.model_cost("xception", order=setting.get("order", "depthwise_first"))
  assert arch.budget_target == reference.params
  if "order" not in setting:
    assert reference.params == 22_855_952
  assert abs(counted / arch.budget_target - 1) <= 0.01
  assert all(w % 8 == 0 for w in arch.widths)
  segments = dict(arch.layer_segments)
  if setting.get("segments") == 4:
    assert all(g == 4 for g in segments.values())
  if "group_width" in setting:
    assert segments["block5_sepconv1"] == arch.width("middle") // 16


def test_budget_solver_with_an_explicit_target_and_an_impossible_one():
  arch = models.create("xception_small", segments=2, budget=2_000_000).architecture()
  params = xception_costs.xception_param_counts(arch)[0]
  assert abs(params / 2_000_000 - 1) <= 0.01
  with pytest.raises(ValueError, match=r"no widths within 1.0% of 1,000 parameters"):
    models.create("xception", segments=1, budget=1000)


def test_solve_widths_on_a_known_function():
  """params = sum(w^2): reaching 2x the base count scales the widths by about sqrt(2)."""
  solution = budget_lib.solve_widths(
    base_widths=(640, 1280),
    quanta=(8, 16),
    target=2 * (640**2 + 1280**2),
    count_params=lambda w: sum(x * x for x in w),
  )
  assert abs(solution.ratio - 1) <= 0.01
  assert solution.widths[0] % 8 == 0 and solution.widths[1] % 16 == 0
  assert abs(solution.widths[0] / 640 - 2**0.5) < 0.02
  assert abs(solution.widths[1] / 1280 - 2**0.5) < 0.02
