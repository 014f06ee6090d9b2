"""Analytic parameter counts and multiply-adds of an Xception architecture, without building it.

Sweeps over the spectrum and the budget solver need costs for many configurations; building and
initialising each model would take seconds to minutes, the formulas take microseconds. Per layer
(M input channels, N output channels, k x k kernel, G groups, output H' x W'):

  conv:        params k^2 * M * N / G          MACs H' * W' * k^2 * M * N / G
  batch norm:  params 2N (scale, bias), batch statistics 2N (mean, var), no MACs
  dense:       params M * N (+ N bias)         MACs M * N

Pooling, additions and activations are not multiply-adds and are left out; that is why XLA's
flop count of the forward pass is slightly above 2 x MACs. `xception_walk` follows the network's
one description (`xception_arch.STEM` and `blocks`), as the module does; the tests compare it with
the counted parameters of the built module and with XLA's cost analysis. Costs of registered models
by name: `costs.model_cost`.
"""
from __future__ import annotations

import math

from xception_jax.models import xception_arch

STAGES = ("stem", "entry", "middle", "exit", "head")


class _Walk:
  """Accumulates parameters, batch statistics and MACs while following the feature-map size."""

  def __init__(self, height: int, width: int, channels: int, exclude_padding: bool = False):
    self.size = (height, width)
    self.exclude_padding = exclude_padding
    self.channels = channels
    self.params = 0
    self.batch_stats = 0
    self.macs = {stage: 0 for stage in STAGES}

  def conv(self, stage: str, features: int, kernel: int, stride: int = 1, padding: str = "SAME",
           groups: int = 1, size=None, channels=None) -> tuple[tuple[int, int], int]:
    """A bias-free conv followed by batch norm, from (size, channels) (default: the current)."""
    size = size or self.size
    channels = channels or self.channels
    out = tuple(_output_size(n, kernel, stride, padding) for n in size)
    weights = kernel * kernel * channels * features // groups
    self.params += weights + 2 * features  # kernel + batch-norm scale and bias
    self.batch_stats += 2 * features
    self.macs[stage] += self._positions(size, kernel, stride, padding) * weights // kernel**2
    return out, features

  def _positions(self, size, kernel, stride, padding) -> int:
    """Output positions x kernel taps, optionally only the taps that land inside the input."""
    if self.exclude_padding:
      return math.prod(_taps_inside(n, kernel, stride, padding) for n in size)
    return math.prod(_output_size(n, kernel, stride, padding) * kernel for n in size)

  def separable(self, stage: str, features: int, segments: int, order: str) -> None:
    """SeparableConv + batch norm on the current feature map (stride 1, SAME)."""
    m, hw = self.channels, self.size[0] * self.size[1]
    spatial_channels = m if order == "depthwise_first" else features
    spatial = 9 * spatial_channels * spatial_channels // segments
    self.params += spatial + m * features + 2 * features
    self.batch_stats += 2 * features
    self.macs[stage] += (self._positions(self.size, 3, 1, "SAME") * spatial // 9 +
                         hw * m * features)
    self.channels = features

  def dense(self, features: int) -> None:
    self.params += self.channels * features + features
    self.macs["head"] += self.channels * features
    self.channels = features


def _output_size(n: int, kernel: int, stride: int, padding: str) -> int:
  if padding == "SAME":
    return math.ceil(n / stride)
  return (n - kernel) // stride + 1


def _taps_inside(n: int, kernel: int, stride: int, padding: str) -> int:
  """Sum over output positions of the kernel taps that fall inside an input of length n.

  TF / lax SAME padding puts floor(total / 2) before and the rest after.
  """
  out = _output_size(n, kernel, stride, padding)
  before = max((out - 1) * stride + kernel - n, 0) // 2 if padding == "SAME" else 0
  return sum(min(o * stride - before + kernel, n) - max(o * stride - before, 0)
             for o in range(out))


def xception_walk(arch: xception_arch.XceptionArchitecture,
                  image_size: tuple[int, int] = (299, 299), exclude_padding: bool = False) -> _Walk:
  """Follows Xception's description layer by layer, accumulating its costs."""
  walk = _Walk(*image_size, channels=3, exclude_padding=exclude_padding)
  for conv in xception_arch.STEM:
    walk.size, walk.channels = walk.conv("stem", arch.width(conv.out_slot), 3, stride=conv.stride,
                                         padding="VALID")
  for block in xception_arch.blocks(arch.num_middle_blocks):
    size, channels = walk.size, walk.channels
    for layer in block.layers:
      walk.separable(block.flow, arch.width(layer.out_slot), arch.segments(layer.name), arch.order)
    if block.pool:  # max pool 3x3 stride 2 SAME
      walk.size = tuple(math.ceil(n / 2) for n in size)
    if arch.shortcut(block) == "conv":  # 1x1 stride-2 conv + BN; its output size equals the pool's
      walk.conv(block.flow, arch.width(block.out_slot), 1, stride=2, size=size, channels=channels)
  if arch.num_classes:
    for features in arch.fc_layers:
      walk.dense(features)
    walk.dense(arch.num_classes)
  return walk


def xception_param_counts(arch: xception_arch.XceptionArchitecture) -> tuple[int, int]:
  """(trainable parameters, batch-statistic entries) of an Xception architecture."""
  walk = xception_walk(arch, (xception_arch.MIN_IMAGE_SIZE, xception_arch.MIN_IMAGE_SIZE))
  return walk.params, walk.batch_stats
