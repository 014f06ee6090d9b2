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

On CPU three convolutions get a different but mathematically equal formulation
(`conv_general_dilated` below, the functions in `cpu_kernels` and `cpu_norm_pool`), chosen per platform with
`jax.lax.platform_dependent` from one table (`CONV_FORMULATIONS`) so that GPU and TPU keep the
native convolution that cuDNN and the TPU compiler handle well until a measurement there says
otherwise. Batch norm in training and max pooling (`max_pool`) also get hand-written backward
passes on CPU. What each rewrite gains is measured in BENCHMARKS.md (sections 2b, 3 and "CPU: ours
against PyTorch/timm"). Parameters keep their shapes and names, so Keras weights and checkpoints
load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from xception_jax.models import cpu_kernels
from xception_jax.models import cpu_norm_pool

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
  In training mode the normalisation has, on CPU, a hand-written backward pass
  (`cpu_norm_pool.batch_norm_bwd`): XLA:CPU's version of the automatic one materialised x - mean in the
  forward pass and made several passes over the activations (BENCHMARKS.md, section 7). The
  values, statistics and variables are Flax's; other platforms, evaluation mode and settings
  this project does not use (a mask, an `axis_name`, another axis) run Flax's code.
  """

  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(
    self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array:
    evaluating = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    if (
      evaluating
      or not cpu_kernels.CPU_BACKWARD["batch_norm"]
      or self.is_initializing()
      or mask is not None
      or self.axis_name is not None
      or self.axis not in (-1, x.ndim - 1)
      or not self.use_fast_variance
      or not self.force_float32_reductions
      or jnp.iscomplexobj(x)
    ):
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    args = [x]
    scale = bias = None
    if self.use_scale:
      scale = self.param("scale", self.scale_init, features, self.param_dtype)
      args.append(scale)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, features, self.param_dtype)
      args.append(bias)
    dtype = self.dtype or jnp.result_type(*args)
    ones = jnp.ones(features, jnp.float32)
    scale = ones if scale is None else scale
    bias = ones * 0 if bias is None else bias
    fn = functools.partial(
      cpu_norm_pool.batch_norm_vjp, epsilon=self.epsilon, dtype=jnp.dtype(dtype)
    )
    native = functools.partial(
      cpu_norm_pool.batch_norm_native, epsilon=self.epsilon, dtype=jnp.dtype(dtype)
    )
    y, mean, var = lax.platform_dependent(x, scale, bias, cpu=fn, default=native)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


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
      f"{', '.join(map(str, divisors(channels)))}"
    )


# ----------------------------------------------------------------------------------------------
# Which formulation each kind of convolution gets, per platform: the one table to change when a
# measurement says another form is faster somewhere. `conv_general_dilated` reads it at trace time
# and lowers, through `lax.platform_dependent`, only the branch of the platform compiled for.
# "rewritten" = `cpu_kernels.depthwise_shifted`, `cpu_kernels.grouped_taps` (with
# `cpu_kernels.merged_groups`), `cpu_kernels.pointwise_dot` and `cpu_kernels.regular_rows`;
# "native" = `lax.conv_general_dilated`. Platforms not listed (tpu, rocm) get the native one.
#
# What each entry rests on:
#   cpu, depthwise, grouped, pointwise: BENCHMARKS.md section 3 (the Xception training step about 2.6x faster
#     with the depthwise and 1x1 rewrites; the depthwise layer's forward and backward 3-60x) and
#     section 2b (grouped convolutions: the step at G = 2..32 4-33x faster).
#   cuda, depthwise, grouped, pointwise: native. Measured so far (BENCHMARKS.md section 1, H200): the native
#     step, in which cuDNN's depthwise kernels take 20% of the kernel time. The comparison is
#     prepared: `bench/gpu_run.sh spectrum` times G = 2..64 with the grouped convs forced to the
#     rewrite, `bench/gpu_run.sh inception` Xception with its depthwise or 1x1 convs forced
#     (`conv_formulation`, the benchmark's --conv_formulation); this table gets the winner per
#     kind with a pointer to the numbers.
#   regular (one group, kernel larger than 1x1: the stem, the spectrum's G = 1, Inception V3's
#     3x3, 5x5, 1x7 and 7x1 convs): on CPU XLA's forward pass and input gradient with the kernel
#     gradient as row products (`cpu_kernels.regular_rows`; block1_conv2's backward-filter conv
#     350 ms -> 52 ms, BENCHMARKS.md section 7); on CUDA native (cuDNN).
#   max_pool (not a convolution, but the same choice): on CPU the hand-written backward of
#     `cpu_norm_pool.max_pool_vjp` (BENCHMARKS.md section 7); on CUDA the native select-and-scatter,
#     whose scatters took 8% of the H200's kernel time (section 1): `bench/gpu_run.sh inception`
#     measures the CPU form there.
# ----------------------------------------------------------------------------------------------

CONV_KINDS = ("depthwise", "grouped", "pointwise", "regular", "max_pool")
CONV_FORMS = ("native", "rewritten")
CONV_FORMULATIONS: dict[str, dict[str, str]] = {
  "depthwise": {"cpu": "rewritten", "cuda": "native"},
  "grouped": {"cpu": "rewritten", "cuda": "native"},
  "pointwise": {"cpu": "rewritten", "cuda": "native"},
  "regular": {"cpu": "rewritten", "cuda": "native"},
  "max_pool": {"cpu": "rewritten", "cuda": "native"},
}

_forced_formulations: dict[str, str] = {}  # set by `conv_formulation` only


def _conv_kind(feature_group_count: int, channels: int, rhs: jax.Array) -> str:
  """'depthwise', 'pointwise' (1x1, one group), 'regular' (one group, larger kernel) or
  'grouped', for a conv that has a rewrite."""
  if feature_group_count == channels:
    return "depthwise"
  if feature_group_count == 1:
    return "pointwise" if rhs.shape[:2] == (1, 1) else "regular"
  return "grouped"


def parse_conv_formulation(spec: str) -> dict[str, str]:
  """'auto' | 'native' | 'rewritten' | 'KIND=FORM,...' -> {kind: form} to force (empty = table).

  'native' and 'rewritten' apply to every kind; KIND is one of CONV_KINDS and FORM one of
  CONV_FORMS or 'auto' (the table). Raises ValueError naming the bad part and the valid values.
  """
  spec = spec.strip()
  if spec == "auto":
    return {}
  if spec in CONV_FORMS:
    return dict.fromkeys(CONV_KINDS, spec)
  forced = {}
  for item in spec.split(","):
    kind, sep, form = (part.strip() for part in item.partition("="))
    if not sep or kind not in CONV_KINDS or form not in (*CONV_FORMS, "auto"):
      raise ValueError(
        f"conv formulation {spec!r}: {item!r} is not KIND=FORM; valid: 'auto', 'native', "
        f"'rewritten', or comma-separated KIND=FORM with KIND in {list(CONV_KINDS)} and FORM "
        f"in {[*CONV_FORMS, 'auto']}"
      )
    if form != "auto":
      forced[kind] = form
  return forced


@contextlib.contextmanager
def conv_formulation(spec: str = "auto") -> Iterator[None]:
  """Forces kinds of convolution to one formulation on every platform while tracing inside.

  For measuring the forms against each other on one device (`tools/benchmark.py
  --conv-formulation`), e.g. `with conv_formulation("grouped=rewritten"):` runs the CPU's
  group-batched products on a GPU. The choice is made when a function is traced, so jit and
  lower inside the block. Not thread-safe; not for training code, which follows the table.
  """
  forced = parse_conv_formulation(spec)
  previous = dict(_forced_formulations)
  _forced_formulations.clear()
  _forced_formulations.update(forced)
  try:
    yield
  finally:
    _forced_formulations.clear()
    _forced_formulations.update(previous)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision: Any = None,
  preferred_element_type: Any = None,
) -> jax.Array:
  """Drop-in `lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`, fast on CPU.

  On CPU, a depthwise convolution (feature_group_count == channels, one kernel per channel) is
  computed as shifted multiply-adds, a grouped one (1 < feature_group_count < channels) as
  group-batched matrix products per kernel offset (narrow groups merged first), and a 1x1
  convolution as a dot_general; all compute the same function (up to float rounding order). Every other convolution is the native
  one. Which platforms get the rewrite is the table `CONV_FORMULATIONS` (today: CPU only, so GPU
  and TPU programs keep the native convolutions), applied by `lax.platform_dependent`, which
  lowers only the branch of the platform being compiled for; `conv_formulation` overrides it for
  measurements.
  """
  native = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if not (
    undilated and batch_group_count == 1 and cpu_kernels.is_nhwc(lhs, rhs, dimension_numbers)
  ):
    return native(lhs, rhs)
  channels = lhs.shape[-1]
  strides = tuple(window_strides)
  pads = cpu_kernels.explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  if feature_group_count == channels > 1 and rhs.shape[2:] == (1, channels):
    cpu = functools.partial(
      cpu_kernels.depthwise_shifted,
      strides=strides,
      pads=pads,
      preferred_element_type=preferred_element_type,
    )
  elif feature_group_count == 1 and rhs.shape[:2] == (1, 1):
    cpu = functools.partial(
      cpu_kernels.pointwise_dot,
      strides=strides,
      pads=pads,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  elif 1 < feature_group_count < channels and rhs.shape[2] * feature_group_count == channels:
    cpu = functools.partial(
      cpu_kernels.grouped_taps,
      strides=strides,
      pads=pads,
      groups=feature_group_count,
      precision=precision,
      preferred_element_type=preferred_element_type,
    )
  elif feature_group_count == 1 and rhs.shape[2] == channels and precision is None:
    cpu = functools.partial(
      cpu_kernels.regular_rows,
      strides=strides,
      pads=pads,
      preferred_element_type=preferred_element_type,
    )
  else:
    return native(lhs, rhs)
  return _by_table(_conv_kind(feature_group_count, channels, rhs), cpu, native, lhs, rhs)


def _by_table(kind: str, rewritten: Callable, native: Callable, *args: jax.Array) -> jax.Array:
  """`rewritten(*args)` or `native(*args)` as `CONV_FORMULATIONS[kind]` (or a forced
  `conv_formulation`) says, per platform through `lax.platform_dependent`."""
  forced = _forced_formulations.get(kind)
  if forced is not None:  # `conv_formulation(...)`: the same form on every platform
    return (rewritten if forced == "rewritten" else native)(*args)
  if not any(isinstance(a, jax.core.Tracer) for a in args):
    # Called eagerly (an un-jitted `model.init` or `apply`): JAX would compile both branches op by
    # op for this one call (30 s for xception_tiny's init); the native op is one op and computes
    # the same values. Jitted code, where speed matters, always traces.
    return native(*args)
  rewritten_on = {
    platform: rewritten for platform, form in CONV_FORMULATIONS[kind].items() if form == "rewritten"
  }
  if not rewritten_on:
    return native(*args)
  return lax.platform_dependent(*args, **rewritten_on, default=native)


def max_pool(
  x: jax.Array,
  window: Sequence[int],
  strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
) -> jax.Array:
  """`nn.max_pool` of an NHWC array, with a backward pass that is fast on CPU.

  XLA:CPU expands max pooling's backward (select_and_scatter) into a variadic reduce-window that
  tracks four int32 index arrays of the input's size, and a scatter (BENCHMARKS.md, section 7).
  On CPU the forward pass here also records, per output, which kernel offset held the (first)
  maximum, in int8, and the backward pass routes the gradient with shifted pads
  (`cpu_norm_pool.max_pool_bwd`); the values and gradients are those of `nn.max_pool`, ties
  included. Where each form runs: `CONV_FORMULATIONS["max_pool"]` (GPU and TPU: `nn.max_pool`).
  """
  window, strides = tuple(window), tuple(strides)
  native = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
  if (
    x.ndim != 4
    or not jnp.issubdtype(x.dtype, jnp.floating)
    or not cpu_kernels.CPU_BACKWARD["max_pool"]
  ):
    return native(x)
  pads = tuple(
    tuple(p) for p in cpu_kernels.explicit_padding(padding, x.shape[1:3], window, strides)
  )
  cpu = functools.partial(cpu_norm_pool.max_pool_vjp, window=window, strides=strides, pads=pads)
  with jax.named_scope("max_pool"):  # names its ops in profiles (bench/profile_step.py)
    return _by_table("max_pool", cpu, native, x)


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
      raise ValueError(
        f"{self.name}: unknown mid_activation {self.mid_activation!r}; valid: {list(ACTIVATIONS)}"
      )
    depthwise_first = self.order == "depthwise_first"
    spatial_channels = x.shape[-1] if depthwise_first else self.features
    segments = spatial_channels if self.segments == "depthwise" else self.segments
    check_segments(segments, spatial_channels, self.name or "SeparableConv")

    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=kernel_init,
      conv_general_dilated=conv_general_dilated,
    )
    spatial = conv(
      spatial_channels,
      (self.kernel_size, self.kernel_size),
      padding="SAME",
      feature_group_count=segments,
      name="spatial",
    )
    pointwise = conv(self.features, (1, 1), padding="VALID", name="pointwise")
    activation = ACTIVATIONS[self.mid_activation]

    x = spatial(x) if depthwise_first else pointwise(x)
    if activation is not None:
      x = activation(x)
    return pointwise(x) if depthwise_first else spatial(x)
