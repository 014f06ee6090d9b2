"""Building blocks shared by the Xception and Inception V3 modules.

Defaults follow Keras Applications (the reference the models must match numerically and the
source of the published ImageNet weights): batch norm with epsilon 1e-3 and momentum 0.99,
glorot-uniform kernels, no conv biases. Parameter leaves are named `kernel` (convs, dense),
`bias` (dense, batch norm), `scale` (batch norm) and batch statistics `mean` / `var`, because
the optimizer applies weight decay to the leaves named `kernel`.

The separable layer is where the paper's spectrum lives: its spatial 3x3 convolution splits the
channels into `segments` independent groups, from 1 (a regular convolution after or before a
1x1) to one per channel (Xception's depthwise separable convolution). It is one
`lax.conv_general_dilated` call with `feature_group_count=segments` (NHWC), never a Python loop
over groups, so it compiles to a single grouped-convolution kernel on GPU.
"""
from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Keras initialises every conv and dense kernel with glorot_uniform and every bias with zeros.
# glorot is symmetric in fan-in / fan-out, so Keras's depthwise layout (3, 3, C, 1) and ours
# (3, 3, 1, C) give the same scale.
kernel_init = nn.initializers.glorot_uniform()

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array] | None] = {
    "none": None,
    "relu": nn.relu,
    "elu": nn.elu,
}

ORDERS = ("depthwise_first", "pointwise_first")


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with the Keras defaults (epsilon 1e-3, momentum 0.99).

  Flax's own defaults (epsilon 1e-5) would make Keras-imported weights give different outputs.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """Turns "float32" / "bfloat16" / a jnp dtype into a jnp dtype, or raises naming the choices."""
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"Unknown compute dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[dtype])
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"Unknown compute dtype {dtype!r}; valid: {sorted(DTYPES)}") from e
  if resolved.name not in DTYPES:
    raise ValueError(f"Unsupported compute dtype {resolved.name!r}; valid: {sorted(DTYPES)}")
  return resolved


def divisors(n: int) -> list[int]:
  """All positive divisors of n, ascending: the segment counts a layer of n channels accepts."""
  return [d for d in range(1, n + 1) if n % d == 0]


def check_segments(segments: int, channels: int, layer: str) -> None:
  """Raises a ValueError naming the layer unless `segments` divides `channels`."""
  if not isinstance(segments, int) or isinstance(segments, bool):
    raise ValueError(f"{layer}: segments must be an int, got {segments!r}")
  if segments < 1 or channels % segments:
    raise ValueError(
        f"{layer}: segments={segments} does not divide the {channels} channels of its spatial "
        f"conv; valid segment counts for {channels} channels: "
        f"{', '.join(map(str, divisors(channels)))}")


class SeparableConv(nn.Module):
  """A separable layer whose spatial step is a grouped conv with `segments` channel segments.

  depthwise_first (Xception / TensorFlow order): spatial k x k conv C -> C in `segments` groups,
  optional activation, then a 1x1 conv C -> features. pointwise_first (the "extreme Inception" of
  the paper's figure 4): 1x1 conv C -> features, optional activation, then the grouped spatial
  conv on `features` channels. Keras's SeparableConv2D has no batch norm and, by default, no
  activation between the two steps (`mid_activation="none"`); the paper's figure 10 compares
  ReLU and ELU there. No biases: a batch norm always follows.

  Attributes:
    features: output channels.
    segments: channel segments of the spatial conv (1 = regular conv, channels = depthwise), or
      "depthwise" for one per channel. Must divide the spatial conv's channel count.
    order: "depthwise_first" or "pointwise_first".
    mid_activation: "none", "relu" or "elu" between the two steps.
    kernel_size: spatial kernel size (square).
    dtype: compute dtype; parameters stay float32.

  Parameters: `spatial/kernel` of shape (k, k, channels / segments, channels) and
  `pointwise/kernel` of shape (1, 1, in, features).
  """
  features: int
  segments: int | str = "depthwise"
  order: str = "depthwise_first"
  mid_activation: str = "none"
  kernel_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.order not in ORDERS:
      raise ValueError(f"{self.name}: unknown order {self.order!r}; valid: {list(ORDERS)}")
    if self.mid_activation not in ACTIVATIONS:
      raise ValueError(f"{self.name}: unknown mid_activation {self.mid_activation!r}; "
                       f"valid: {list(ACTIVATIONS)}")
    depthwise_first = self.order == "depthwise_first"
    spatial_channels = x.shape[-1] if depthwise_first else self.features
    segments = spatial_channels if self.segments == "depthwise" else self.segments
    check_segments(segments, spatial_channels, self.name or "SeparableConv")

    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kernel_init)
    spatial = conv(spatial_channels, (self.kernel_size, self.kernel_size), padding="SAME",
                   feature_group_count=segments, name="spatial")
    pointwise = conv(self.features, (1, 1), padding="VALID", name="pointwise")
    activation = ACTIVATIONS[self.mid_activation]

    x = spatial(x) if depthwise_first else pointwise(x)
    if activation is not None:
      x = activation(x)
    return pointwise(x) if depthwise_first else spatial(x)
