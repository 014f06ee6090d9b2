"""Costs of a registered model by name: parameters, batch statistics and multiply-adds.

`model_cost` derives them analytically for the Xception family (the formulas and the walk over the
network's description are in `xception_costs`), without building or tracing the model: sweeps
over the spectrum need costs for many configurations. `counted_cost` counts them for any model
from `jax.eval_shape` and XLA's cost analysis.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xception_jax import models
from xception_jax.models import xception as xception_lib
from xception_jax.models import xception_arch
from xception_jax.models import xception_costs


@dataclasses.dataclass(frozen=True)
class ModelCost:
  """Costs of one configuration at one input size.

  Attributes:
    model: registry name.
    image_size: (height, width) the MACs are for.
    params: trainable parameters.
    batch_stat_entries: batch-norm moving statistics (mean and var entries).
    macs_per_stage: multiply-adds of one image's forward pass per stage
      (`xception_costs.STAGES` for the analytic costs, one "total" for the counted ones).
    architecture: the resolved Xception architecture (widths, per-layer segments).
  """
  model: str
  image_size: tuple[int, int]
  params: int
  batch_stat_entries: int
  macs_per_stage: dict[str, int]
  architecture: xception_arch.XceptionArchitecture | None = None

  @property
  def macs_total(self) -> int:
    return sum(self.macs_per_stage.values())


def _image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  image_size = tuple(int(n) for n in image_size)
  if len(image_size) != 2 or min(image_size) < xception_arch.MIN_IMAGE_SIZE:
    raise ValueError(f"image_size must be an int or (height, width), each >= "
                     f"{xception_arch.MIN_IMAGE_SIZE} for Xception, got {image_size}")
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
  module = models.create(name, **kwargs)
  if not isinstance(module, xception_lib.Xception):
    raise ValueError(f"model_cost has analytic formulas for the Xception family only, not "
                     f"{name!r}; use costs.counted_cost({name!r}, ...) (jax.eval_shape and XLA's "
                     "cost analysis) for other models")
  image_size = _image_size(image_size)
  arch = module.architecture()
  walk = xception_costs.xception_walk(arch, image_size, exclude_padding)
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
