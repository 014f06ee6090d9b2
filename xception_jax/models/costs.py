"""Analytic parameter counts and multiply-adds, computed without building a model.

Sweeps over the spectrum need costs for many configurations; building and initialising each model
would take seconds to minutes, the formulas take microseconds. Per layer (M input channels, N
output channels, k x k kernel, G groups, output H' x W'):

  conv:        params k^2 * M * N / G          MACs H' * W' * k^2 * M * N / G
  batch norm:  params 2N (scale, bias), batch statistics 2N (mean, var), no MACs
  dense:       params M * N (+ N bias)         MACs M * N

Pooling, additions and activations are not multiply-adds and are left out; that is why XLA's
flop count of the forward pass is slightly above 2 x MACs. The walk below mirrors
`xception.Xception.__call__` layer by layer from the same resolved `XceptionArchitecture`; the
tests compare it with the counted parameters of the built module and with XLA's cost analysis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from xception_jax.models import xception as xception_lib

STAGES = ("stem", "entry", "middle", "exit", "head")


@dataclasses.dataclass(frozen=True)
class ModelCost:
  """Costs of one configuration at one input size.

  Attributes:
    model: registry name.
    image_size: (height, width) the MACs are for.
    params: trainable parameters.
    batch_stat_entries: batch-norm moving statistics (mean and var entries).
    macs_per_stage: multiply-adds of one image's forward pass per stage (stem, entry, middle,
      exit, head).
    architecture: the resolved Xception architecture (widths, per-layer segments).
  """
  model: str
  image_size: tuple[int, int]
  params: int
  batch_stat_entries: int
  macs_per_stage: dict[str, int]
  architecture: xception_lib.XceptionArchitecture | None = None

  @property
  def macs_total(self) -> int:
    return sum(self.macs_per_stage.values())


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


def xception_walk(arch: xception_lib.XceptionArchitecture,
                  image_size: tuple[int, int] = (299, 299), exclude_padding: bool = False) -> _Walk:
  """Follows Xception layer by layer (see `Xception.__call__`), accumulating its costs."""
  walk = _Walk(*image_size, channels=3, exclude_padding=exclude_padding)
  width = arch.width
  blocks = xception_lib.block_names(arch.num_middle_blocks)

  def advance(result):
    walk.size, walk.channels = result

  advance(walk.conv("stem", width("stem1"), 3, stride=2, padding="VALID"))
  advance(walk.conv("stem", width("stem2"), 3, padding="VALID"))

  def downsampling_block(stage, block, sepconv_widths):
    size, channels = walk.size, walk.channels
    for j, features in enumerate(sepconv_widths, start=1):
      walk.separable(stage, features, arch.segments(f"{block}_sepconv{j}"), arch.order)
    walk.size = tuple(math.ceil(n / 2) for n in size)  # max pool 3x3 stride 2 SAME
    if arch.residual:  # 1x1 stride-2 shortcut conv + BN; its output size equals the pool's
      walk.conv(stage, sepconv_widths[-1], 1, stride=2, size=size, channels=channels)

  for block, slot in zip(blocks["entry"], ("entry1", "entry2", "middle")):
    downsampling_block("entry", block, (width(slot), width(slot)))
  for block in blocks["middle"]:
    for j in (1, 2, 3):
      walk.separable("middle", width("middle"), arch.segments(f"{block}_sepconv{j}"), arch.order)
  block13, block14 = blocks["exit"]
  downsampling_block("exit", block13, (width("middle"), width("exit1")))
  walk.separable("exit", width("exit2"), arch.segments(f"{block14}_sepconv1"), arch.order)
  walk.separable("exit", width("exit3"), arch.segments(f"{block14}_sepconv2"), arch.order)

  if arch.num_classes:
    for features in arch.fc_layers:
      walk.dense(features)
    walk.dense(arch.num_classes)
  return walk


def xception_param_counts(arch: xception_lib.XceptionArchitecture) -> tuple[int, int]:
  """(trainable parameters, batch-statistic entries) of an Xception architecture."""
  walk = xception_walk(arch, (xception_lib.MIN_IMAGE_SIZE, xception_lib.MIN_IMAGE_SIZE))
  return walk.params, walk.batch_stats


def _image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  image_size = tuple(int(n) for n in image_size)
  if len(image_size) != 2 or min(image_size) < xception_lib.MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be an int or (height, width), each >= "
                     f"{xception_lib.MIN_IMAGE_SIZE} for Xception, got {image_size}")
  return image_size


def model_cost(name: str, image_size: int | tuple[int, int] = 299, *,
               exclude_padding: bool = False, **kwargs: Any) -> ModelCost:
  """Analytic params, batch-statistic entries and MACs per stage of a registered Xception model.

  Args:
    name: registry name (xception, xception_small, ...).
    image_size: input size, an int (square) or (height, width).
    exclude_padding: count only kernel taps that land inside the (unpadded) input, as XLA's cost
      analysis does. The default counts every tap of every output position, the convention of
      the published figures (Xception at 299: about 8.36 G); the two differ noticeably for
      regular 3x3 convs on the small late feature maps.
    **kwargs: the same keyword arguments as `models.create(name, ...)`.

  The module is constructed (which validates the settings and resolves widths and segments) but
  never initialised or traced.
  """
  from xception_jax import models  # pylint: disable=g-import-not-at-top
  module = models.create(name, **kwargs)
  if not isinstance(module, xception_lib.Xception):
    raise ValueError(f"model_cost has analytic formulas for the Xception family only, not "
                     f"{name!r}; use costs.counted_cost({name!r}, ...) (jax.eval_shape and XLA's "
                     "cost analysis) for other models")
  image_size = _image_size(image_size)
  arch = module.architecture()
  walk = xception_walk(arch, image_size, exclude_padding)
  return ModelCost(model=name, image_size=image_size, params=walk.params,
                   batch_stat_entries=walk.batch_stats, macs_per_stage=dict(walk.macs),
                   architecture=arch)


def counted_cost(name: str, image_size: int | tuple[int, int] = 299, **kwargs: Any) -> ModelCost:
  """Costs of any registered model, counted rather than derived: for models without formulas.

  Parameters and batch statistics come from `jax.eval_shape(model.init)` (no initialisation), the
  multiply-adds from XLA's cost analysis of the lowered forward pass (flops / 2), reported as one
  "total" stage. That figure includes batch norm, pooling and activations and skips kernel taps
  on padding, so it is close to, not the same as, the conventional count `model_cost` gives.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from xception_jax import models  # pylint: disable=g-import-not-at-top

  module = models.create(name, **kwargs)
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0),
                             images)
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  lowered = jax.jit(functools.partial(module.apply, train=False)).lower(variables, images)
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return ModelCost(model=name, image_size=tuple(image_size),
                   params=count(variables.get("params", {})),
                   batch_stat_entries=count(variables.get("batch_stats", {})),
                   macs_per_stage={"total": int(analysis["flops"] // 2)})
