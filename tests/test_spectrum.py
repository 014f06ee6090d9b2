"""The spectrum knobs at the layer level, the resolved per-layer segments, and the analytic MACs.

The separable layer is checked against convolutions built independently of it: lax convs for the
two ends of the spectrum (regular and depthwise), NumPy split-convolve-concatenate for grouped.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import models
from xception_jax.models import costs
from xception_jax.models import layers
from xception_jax.models import xception as xception_lib
from xception_jax.models import xception_costs


def _apply_layer(layer, x, seed=0):
  """Initialises a layer with NumPy-random kernels (no jax RNG compile) and applies it."""
  shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  return params["params"], layer.apply(params, x)


def _lax_conv(x, kernel, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups,
                                      precision=jax.lax.Precision.HIGHEST)


def _numpy_conv_same(x, kernel):
  """Regular stride-1 SAME conv in NumPy: x [B,H,W,M], kernel [k,k,M,N]."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  padded = np.pad(x, ((0, 0), (pad, k - 1 - pad), (pad, k - 1 - pad), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(k):
    for j in range(k):
      out += np.einsum("bhwm,mn->bhwn", padded[:, i:i + h, j:j + w], kernel[i, j])
  return out


def _pointwise(x, kernel):
  return jnp.einsum("bhwm,mn->bhwn", x, kernel[0, 0], precision=jax.lax.Precision.HIGHEST)


X = np.random.default_rng(1).normal(size=(2, 9, 7, 16)).astype(np.float32)


def test_one_segment_is_a_regular_conv_then_pointwise():
  params, out = _apply_layer(layers.SeparableConv(24, segments=1), X)
  spatial, pointwise = params["spatial"]["kernel"], params["pointwise"]["kernel"]
  assert spatial.shape == (3, 3, 16, 16) and pointwise.shape == (1, 1, 16, 24)
  expected = _pointwise(_lax_conv(X, spatial), pointwise)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_one_segment_per_channel_is_a_depthwise_conv():
  """segments=C and "depthwise" are Keras's DepthwiseConv2D: kernel (3,3,C,1) -> ours (3,3,1,C)."""
  params, out = _apply_layer(layers.SeparableConv(24, segments=16), X)
  _, out_named = _apply_layer(layers.SeparableConv(24, segments="depthwise"), X)
  np.testing.assert_array_equal(out, out_named)
  spatial = params["spatial"]["kernel"]
  assert spatial.shape == (3, 3, 1, 16)
  # Independent depthwise conv: each channel convolved with its own 3x3 filter, written as a
  # dense conv whose kernel is zero off the channel diagonal.
  dense_kernel = np.einsum("hwc,cd->hwcd", np.asarray(spatial[:, :, 0, :]), np.eye(16))
  expected = _pointwise(_lax_conv(X, dense_kernel), params["pointwise"]["kernel"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("segments", [2, 4, 8])
def test_grouped_conv_is_split_convolve_concatenate(segments):
  params, out = _apply_layer(layers.SeparableConv(24, segments=segments), X)
  spatial = np.asarray(params["spatial"]["kernel"])
  assert spatial.shape == (3, 3, 16 // segments, 16)
  size = 16 // segments
  pieces = [_numpy_conv_same(X[..., g * size:(g + 1) * size], spatial[..., g * size:(g + 1) * size])
            for g in range(segments)]
  expected = _pointwise(np.concatenate(pieces, axis=-1).astype(np.float32),
                        params["pointwise"]["kernel"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,activation", [("relu", jax.nn.relu), ("elu", jax.nn.elu)])
def test_mid_activation_sits_between_spatial_and_pointwise(name, activation):
  params, out = _apply_layer(layers.SeparableConv(24, segments=4, mid_activation=name), X)
  expected = _pointwise(activation(_lax_conv(X, params["spatial"]["kernel"], groups=4)),
                        params["pointwise"]["kernel"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_pointwise_first_order_groups_the_output_channels():
  params, out = _apply_layer(
      layers.SeparableConv(24, segments=6, order="pointwise_first", mid_activation="relu"), X)
  assert params["pointwise"]["kernel"].shape == (1, 1, 16, 24)
  assert params["spatial"]["kernel"].shape == (3, 3, 4, 24)
  expected = _lax_conv(jax.nn.relu(_pointwise(X, params["pointwise"]["kernel"])),
                       params["spatial"]["kernel"], groups=6)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_separable_layer_rejects_a_segment_count_that_does_not_divide():
  with pytest.raises(ValueError,
                     match=r"sep: segments=3 does not divide the 16 channels.*1, 2, 4, 8, 16"):
    layers.SeparableConv(24, segments=3, name="sep").init(jax.random.key(0), X)


def test_same_padding_puts_the_extra_pixel_at_the_end():
  """TF SAME (Keras's padding): 3x3 stride-2 windows on 8 pixels start at 0, 2, 4, 6 (0 padding
  before, 1 after); symmetric padding would start them at -1, 1, 3, 5. The model's max pools rely
  on lax/flax "SAME" being the TF one."""
  x = np.zeros((1, 8, 8, 1), np.float32)
  x[0, 0, 0, 0] = 1.0
  x[0, 2, 2, 0] = 2.0  # inside windows (0,0), (0,1), (1,0), (1,1) under TF padding only
  pooled = np.asarray(nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"))[0, :, :, 0]
  assert pooled[0, 0] == 2.0 and pooled[1, 1] == 2.0 and pooled[0, 2] == 0.0


def test_per_flow_segments_and_group_width_resolve_per_layer():
  arch = models.create("xception", segments={"entry": 1, "middle": 7}).architecture()
  segments = dict(arch.layer_segments)
  assert segments["block2_sepconv1"] == 1 and segments["block4_sepconv2"] == 1
  assert all(segments[f"block{b}_sepconv{j}"] == 7 for b in range(5, 13) for j in (1, 2, 3))
  assert segments["block13_sepconv1"] == 728 and segments["block14_sepconv2"] == 1536  # depthwise

  arch = models.create("xception", group_width=8).architecture()
  assert dict(arch.layer_segments)["block2_sepconv1"] == 64 // 8
  assert dict(arch.layer_segments)["block14_sepconv2"] == 1536 // 8
  assert models.create("xception", group_width=1).architecture().layer_segments == (
      models.create("xception").architecture().layer_segments)

  pointwise_first = models.create("xception", segments=4, order="pointwise_first").architecture()
  # Pointwise-first groups the layer's output channels: block14_sepconv2 outputs 2048.
  shapes = jax.eval_shape(
      functools.partial(models.create("xception_tiny", segments=4, order="pointwise_first").init,
                        train=False), jax.random.key(0), jnp.zeros((1, 71, 71, 3)))
  tiny = shapes["params"]["block7_sepconv2"]
  assert tiny["pointwise"]["kernel"].shape == (1, 1, 192, 256)
  assert tiny["spatial"]["kernel"].shape == (3, 3, 64, 256)
  assert pointwise_first.segments("block14_sepconv2") == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(segments=16), r"block4_sepconv2.*728 channels.*1, 2, 4, 7, 8, 13, 14, 26"),
    (dict(segments=3), r"segments=3 does not divide the 64 channels .*block2_sepconv1"),
    (dict(segments={"middle": 3}), r"block5_sepconv1 \(and 23 more layers of 728\)"),
    (dict(segments={"midle": 4}), r"unknown flow\(s\) \['midle'\].*'entry', 'middle', 'exit'"),
    (dict(group_width=3), r"group_width=3 does not divide the 64 channels"),
    (dict(segments=4, group_width=4), r"give one"),
    (dict(segments=0), r"segments=0 is not valid"),
    (dict(segments="grouped"), r"segments='grouped' is not valid"),
    (dict(order="inception"), r"Unknown order 'inception'.*depthwise_first"),
    (dict(mid_activation="gelu"), r"Unknown mid_activation 'gelu'.*'none', 'relu', 'elu'"),
    (dict(dropout_rate=1.5), r"dropout_rate must be in \[0, 1\)"),
    (dict(width_multiplier=0), r"width_multiplier must be a positive number"),
    (dict(num_middle_blocks=-1), r"num_middle_blocks must be an int >= 0"),
    (dict(fc_layers=(64, 0)), r"fc_layers\[1\] must be an int >= 1"),
    (dict(widths=(32, 64)), r"widths needs 8 ints"),
    (dict(budget="flops"), r"budget must be None, 'params'"),
    (dict(dtype="float64"), r"Unknown compute dtype 'float64'"),
])
def test_invalid_settings_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.create("xception", **kwargs)


def test_segments_message_lists_the_counts_valid_for_every_layer():
  with pytest.raises(ValueError, match=r"valid for every layer at these widths: \[1, 2, 4, 8\]"):
    xception_lib.Xception(segments=16)  # direct construction validates too


def _xla_flops(name, size, **kwargs):
  model = models.create(name, num_classes=10, **kwargs)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
  compiled = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images).compile()
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(segments=1),
    dict(segments=8, order="pointwise_first", fc_layers=(64,)),
])
def test_macs_agree_with_xla_cost_analysis(kwargs, monkeypatch):
  """XLA counts a multiply-add of a native convolution as 2 flops and skips taps on padding; BN,
  ReLU, pooling and adds are the small extras on top. Full widths (1 middle block, 71x71) keep the
  extras around 1%. Native convolutions throughout: the CPU rewrites of models/layers.py multiply
  the padding too, which XLA would count."""
  monkeypatch.setattr(layers, "conv_general_dilated", jax.lax.conv_general_dilated)
  kwargs = dict(num_middle_blocks=1, **kwargs)
  cost = costs.model_cost("xception", 71, num_classes=10, exclude_padding=True, **kwargs)
  conventional = costs.model_cost("xception", 71, num_classes=10, **kwargs)
  flops = _xla_flops("xception", 71, **kwargs)
  assert 1.0 <= flops / (2 * cost.macs_total) < 1.03
  assert conventional.macs_total >= cost.macs_total


def test_macs_at_299_match_the_published_figure():
  cost = costs.model_cost("xception")
  assert cost.macs_total == sum(cost.macs_per_stage.values())
  assert abs(cost.macs_total / 1e9 - 8.36) < 0.01
  assert set(cost.macs_per_stage) == set(xception_costs.STAGES)
