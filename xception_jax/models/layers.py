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
(`conv_general_dilated` below), chosen per platform with `jax.lax.platform_dependent` from one
table (`CONV_FORMULATIONS`) so that GPU and TPU keep the native convolution that cuDNN and the TPU
compiler handle well until a measurement there says otherwise. XLA:CPU runs the
depthwise 3x3 convolution (and above all its two backward convolutions), grouped convolutions
and the weight gradient of 1x1 convolutions far below the machine's rate; the rewrites (shifted
multiply-adds, group-batched matrix products, a matrix product over channels) made the Xception
training step 2.7x faster than Keras 3's on CPU (BENCHMARKS.md, section 3) and the intermediate
segment counts' steps 4-31x faster (section 2b). The depthwise and 1x1 rewrites, batch norm in
training and max pooling (`max_pool`) also have hand-written backward passes on CPU, because the
ones XLA:CPU derived materialised shifted copies, transposes and index arrays of the
activations (section 6). Parameters keep their shapes and names, so Keras weights and
checkpoints load unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
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

# Which hand-written CPU backward passes are used (the rest differentiate automatically); for
# measuring each against XLA's own derivative (BENCHMARKS.md, "CPU: ours against PyTorch/timm").
CPU_BACKWARD = {"depthwise": True, "pointwise": True, "batch_norm": True, "max_pool": True}


def _batch_norm_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batch mean and variance over all but the last axis, as Flax computes them in training
  (float32, Var = E[x^2] - E[x]^2 clipped at 0)."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean, mean2 = xf.mean(axes), lax.square(xf).mean(axes)
  return mean, jnp.maximum(0.0, mean2 - lax.square(mean))


def _batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype):
  """Flax's `_normalize`, op for op: (x - mean) * (rsqrt(var + eps) * scale) + bias."""
  mul = lax.rsqrt(var + epsilon) * scale
  return jnp.asarray((x - mean) * mul + bias, dtype)


def _batch_norm_native(x, scale, bias, epsilon, dtype):
  mean, var = _batch_norm_stats(x)
  return _batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_vjp(x, scale, bias, epsilon, dtype):
  return _batch_norm_native(x, scale, bias, epsilon, dtype)


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, var = _batch_norm_stats(x)
  y = _batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, var, scale)


def _batch_norm_bwd(epsilon, dtype, residuals, cotangents):
  """The batch-norm gradient in closed form: two per-channel sums over (g, x) and one
  elementwise pass. Also exact for cotangents of the returned mean and variance."""
  del dtype
  # As in `_depthwise_bwd`: no x - mean shared with (and materialised by) the forward pass.
  x, mean, var, scale = lax.optimization_barrier(residuals)
  g, g_mean, g_var = cotangents
  acc = mean.dtype
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  inv = lax.rsqrt(var + epsilon)
  xf, g = x.astype(acc), g.astype(acc)
  sum_g, sum_gc = jnp.sum(g, axes), jnp.sum(g * (xf - mean), axes)
  # var = max(0, E[x^2] - E[x]^2): dvar/dx = 2 (x - mean) / n where not clipped, else 0.
  d_var = (g_var - 0.5 * scale * inv ** 3 * sum_gc) * (var > 0)
  d_mean = g_mean - inv * scale * sum_g
  # grad_x = g * inv * scale + d_mean / n + (x - mean) * 2 d_var / n, written affine in x so
  # that no x - mean array is shared with (and materialised for) the sum above.
  slope = 2.0 * d_var / n
  grad_x = g * (inv * scale) + xf * slope + (d_mean / n - mean * slope)
  return (grad_x.astype(x.dtype), (sum_gc * inv).astype(scale.dtype), sum_g.astype(scale.dtype))


_batch_norm_vjp.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with the Keras defaults (epsilon 1e-3, momentum 0.99).

  Flax's own defaults (epsilon 1e-5) would make Keras-imported weights give different outputs.
  In training mode the normalisation has, on CPU, a hand-written backward pass
  (`_batch_norm_bwd`): XLA:CPU's version of the automatic one materialised x - mean in the
  forward pass and made several passes over the activations (BENCHMARKS.md, section 6). The
  values, statistics and variables are Flax's; other platforms, evaluation mode and settings
  this project does not use (a mask, an `axis_name`, another axis) run Flax's code.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    evaluating = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
    if (evaluating or not CPU_BACKWARD["batch_norm"] or self.is_initializing() or mask is not None
        or self.axis_name is not None or self.axis not in (-1, x.ndim - 1)
        or not self.use_fast_variance or not self.force_float32_reductions
        or jnp.iscomplexobj(x)):
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
    fn = functools.partial(_batch_norm_vjp, epsilon=self.epsilon, dtype=jnp.dtype(dtype))
    native = functools.partial(_batch_norm_native, epsilon=self.epsilon, dtype=jnp.dtype(dtype))
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
        f"{', '.join(map(str, divisors(channels)))}")


_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  """True when `dimension_numbers` means NHWC inputs / HWIO kernels / NHWC outputs.

  Flax's `nn.Conv` passes a `ConvDimensionNumbers` of index permutations for NHWC; compare on
  that canonical form so strings and tuples given by other callers are recognised too.
  """
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return False
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return canonical == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def _explicit_padding(padding: str | Sequence[tuple[int, int]], in_shape: Sequence[int],
                      window: Sequence[int], strides: Sequence[int]) -> list[tuple[int, int]]:
  """(low, high) pads per spatial dim; "SAME" puts the odd extra pixel at the end, as TF does."""
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(in_shape, window, strides, padding)]
  return [tuple(p) for p in padding]


def _pad_nhwc(x: jax.Array, value: Any, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """lax.pad of the two spatial dims of an NHWC array (negative pads crop, as in lax.pad)."""
  return lax.pad(x, jnp.array(value, x.dtype),
                 [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])


def _window_slices(xp: jax.Array, window: Sequence[int], strides: Sequence[int],
                   out_hw: Sequence[int]):
  """Yields ((i, j), slice) for every kernel offset: xp[:, i::sh, j::sw][:, :Ho, :Wo]."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      end = (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c)
      yield (i, j), lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _shifted_products(xp: jax.Array, taps: jax.Array, strides: Sequence[int],
                      out_hw: Sequence[int], acc: Any) -> jax.Array:
  """sum over kernel offsets (i, j) of xp[:, i::sh, j::sw][:, :Ho, :Wo] * taps[i, j], in acc."""
  out = None
  for (i, j), window in _window_slices(xp, taps.shape[:2], strides, out_hw):
    term = window.astype(acc) * taps[i, j].astype(acc)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_vjp(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, ...],
                   pads: tuple[tuple[int, int], ...], out_dtype: Any) -> jax.Array:
  return _depthwise_fwd(lhs, rhs, strides, pads, out_dtype)[0]


def _depthwise_fwd(lhs, rhs, strides, pads, out_dtype):
  kh, kw = rhs.shape[:2]
  xp = _pad_nhwc(lhs, 0, pads)
  out_hw = [(xp.shape[1 + d] - (kh, kw)[d]) // strides[d] + 1 for d in range(2)]
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  # The padded input is the residual: XLA materialises it for the forward pass anyway, and the
  # backward pass then slices a buffer instead of padding again.
  return _shifted_products(xp, rhs[:, :, 0], strides, out_hw, acc).astype(out_dtype), (xp, rhs)


# The kernel gradient sums at most this many images per fused loop (`_window_sums`).
_KERNEL_GRAD_IMAGES = 32


def _window_sums(xp: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int],
                 acc: Any) -> jax.Array:
  """[kh * kw, C]: per kernel offset, the sum over batch and pixels of shifted window x g.

  XLA:CPU emits reductions as scalar loops unless YNNPACK takes them, and YNNPACK takes only
  reductions of unsliced inputs: nine `sum(window * g)` each copied a shifted slice of the
  activation first, and one variadic reduction of the nine products ran as one scalar loop.
  Here the batch is summed first with elementwise adds, image by image (one vectorised loop
  over [offsets, H, W, C] that reads the activation and its gradient once), and only the
  remaining pixel sums, of a plain array, are reductions (BENCHMARKS.md, section 6).
  """
  windows = [w for _, w in _window_slices(xp, window, strides, g.shape[1:3])]
  total = None
  for start in range(0, g.shape[0], _KERNEL_GRAD_IMAGES):
    images = range(start, min(start + _KERNEL_GRAD_IMAGES, g.shape[0]))
    g_acc = [g[k].astype(acc) for k in images]
    per_offset = jnp.stack([functools.reduce(jnp.add, [w[k].astype(acc) * g_k
                                                       for k, g_k in zip(images, g_acc)])
                            for w in windows])
    part = jnp.sum(per_offset, axis=(1, 2))
    total = part if total is None else total + part
  return total


def _depthwise_bwd(strides, pads, out_dtype, residuals, g):
  """Input gradient: the same shifted multiply-adds on the (dilated, padded) output gradient with
  the flipped kernel; kernel gradient: per offset, the sum of window x gradient."""
  del out_dtype
  # The barrier keeps XLA from sharing work below with the forward pass (CSE), which would
  # materialise it there and keep it alive until now.
  xp, rhs = lax.optimization_barrier(residuals)
  kh, kw = rhs.shape[:2]
  acc = jnp.promote_types(xp.dtype, jnp.float32)
  in_hw = [xp.shape[1 + d] - pads[d][0] - pads[d][1] for d in range(2)]
  out_hw = g.shape[1:3]
  # lhs position p receives g[o] * rhs[p + lo - s * o]: pad g so that this is a stride-1
  # correlation with the flipped kernel (interior padding undoes the stride).
  g_pads = [((kh, kw)[d] - 1 - pads[d][0], in_hw[d] + pads[d][0] - (out_hw[d] - 1) * strides[d] - 1,
             strides[d] - 1) for d in range(2)]
  gp = lax.pad(g, jnp.array(0, g.dtype), [(0, 0, 0), *g_pads, (0, 0, 0)])
  grad_lhs = _shifted_products(gp, rhs[::-1, ::-1, 0], (1, 1), in_hw, acc).astype(xp.dtype)
  grad_rhs = _window_sums(xp, g, (kh, kw), strides, acc).reshape(rhs.shape).astype(rhs.dtype)
  return grad_lhs, grad_rhs


_depthwise_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def _depthwise_shifted(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int],
                       pads: Sequence[tuple[int, int]], preferred_element_type: Any) -> jax.Array:
  """Depthwise conv (rhs (kh, kw, 1, C)) as a sum over kernel offsets of shifted slices x row.

  Elementwise ops that XLA:CPU fuses into one loop over the output, with a backward made of
  pads, slices and reductions, instead of the grouped-convolution kernels it runs slowly.
  The backward pass is written by hand (`_depthwise_bwd`): differentiated automatically, the
  forward pass kept its nine shifted slices as materialised residuals, nine extra copies of the
  activation per layer (BENCHMARKS.md, section 6).
  Accumulates in float32 (bf16 inputs round once, at the end) and returns the input dtype.
  """
  if not CPU_BACKWARD["depthwise"]:
    return _depthwise_fwd(lhs, rhs, tuple(strides), tuple(tuple(p) for p in pads),
                          jnp.dtype(preferred_element_type or lhs.dtype))[0]
  return _depthwise_vjp(lhs, rhs, tuple(strides), tuple(tuple(p) for p in pads),
                        jnp.dtype(preferred_element_type or lhs.dtype))


# On CPU, groups narrower than this are merged into block-diagonal groups of at most this many
# input channels (`_merged_groups`); wider groups are computed as they are.
_MIN_BLOCK_CHANNELS = 32


def _merged_groups(rhs: jax.Array, groups: int) -> tuple[jax.Array, int]:
  """The same grouped conv with k adjacent groups merged into one block-diagonal group.

  A group of 2 to 16 channels is a matrix product too small to run well on CPU: at 64 segments
  the 2-channel groups of Xception's 71x71 entry layer took 7x the depthwise layer's time. Merging
  k groups multiplies the arithmetic by k (the off-diagonal blocks are zeros) but runs it at the
  rate of a 32-channel product, which is faster up to k = 16 (BENCHMARKS.md, section 2b). k is the
  largest divisor of `groups` that keeps blocks within `_MIN_BLOCK_CHANNELS` input channels. The
  zero blocks are built from the kernel, so their gradients are dropped: the function and its
  derivatives are those of the original grouped conv.
  """
  kh, kw, group_in, out_channels = rhs.shape
  k = max(n for n in range(1, groups + 1)
          if groups % n == 0 and n * group_in <= max(_MIN_BLOCK_CHANNELS, group_in))
  if k == 1:
    return rhs, groups
  d = out_channels // groups
  kernel = rhs.reshape(kh, kw, group_in, groups // k, k, d)
  block_diagonal = jnp.einsum("hwigao,ab->hwaigbo", kernel, jnp.eye(k, dtype=rhs.dtype))
  return block_diagonal.reshape(kh, kw, k * group_in, out_channels), groups // k


def _grouped_taps(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int],
                  pads: Sequence[tuple[int, int]], groups: int, precision: Any,
                  preferred_element_type: Any) -> jax.Array:
  """Grouped conv (rhs (kh, kw, C / groups, C_out)) as a sum over kernel offsets of one
  group-batched matrix product each: [groups, pixels, C / groups] x [groups, C / groups, d].

  XLA:CPU runs a convolution with 1 < feature_group_count < channels (the spectrum's
  intermediate segment counts) far below the rate of the same work as batched matrix products:
  the Xception training step at 8 segments took 20x the regular-conv step, rising with the
  segment count (BENCHMARKS.md, section 2b). Groups narrower than `_MIN_BLOCK_CHANNELS` are
  merged first (`_merged_groups`). Accumulates in float32, returns the input dtype.
  """
  rhs, groups = _merged_groups(rhs, groups)
  kh, kw, group_in, out_channels = rhs.shape
  d = out_channels // groups
  xp = _pad_nhwc(lhs, 0, pads)
  b = lhs.shape[0]
  ho, wo = [(xp.shape[1 + k] - (kh, kw)[k]) // strides[k] + 1 for k in range(2)]
  kernel = rhs.reshape(kh, kw, group_in, groups, d)
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  out = None  # [groups, b, ho, wo, d]: dot_general puts the batch (group) dimension first
  for (i, j), window in _window_slices(xp, (kh, kw), strides, (ho, wo)):
    term = lax.dot_general(window.reshape(b, ho, wo, groups, group_in), kernel[i, j],
                           (((4,), (0,)), ((3,), (1,))), precision=precision,
                           preferred_element_type=acc)
    out = term if out is None else out + term
  out = jnp.moveaxis(out, 0, 3).reshape(b, ho, wo, out_channels)
  return out.astype(preferred_element_type or lhs.dtype)


@jax.custom_vjp
def _channel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., C_in] @ w [C_in, C_out], with its two gradients written as 2-D matrix products."""
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _channel_dot_fwd(x, w):
  return _channel_dot(x, w), (x, w)


def _channel_dot_bwd(residuals, g):
  """grad x = g @ w^T; grad w = x^T @ g over all pixels, on [pixels, channels] views.

  Differentiated automatically, XLA:CPU computed the weight gradient from a transposed copy
  ([C_out, pixels]) of the output gradient, written by the batch-norm backward fusion that
  produces it, and computed that fusion a second time for the input gradient: the transposed
  writes were about a tenth of the training step (BENCHMARKS.md, section 6).
  """
  x, w = residuals
  grad_x = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  grad_w = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                           (((0,), (0,)), ((), ())))
  return grad_x, grad_w


_channel_dot.defvjp(_channel_dot_fwd, _channel_dot_bwd)


def _pointwise_dot(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int],
                   pads: Sequence[tuple[int, int]], precision: Any,
                   preferred_element_type: Any) -> jax.Array:
  """1x1 conv as a matrix product over channels (on the strided, padded input when needed).

  XLA:CPU computes the weight gradient of a 1x1 convolution about 2x slower than the same
  contraction written as a dot_general. Without `precision` or `preferred_element_type`
  (Flax passes neither) the product is `_channel_dot`, whose gradients are explicit 2-D products.
  """
  if any(p != (0, 0) for p in pads):
    lhs = _pad_nhwc(lhs, 0, pads)
  if tuple(strides) != (1, 1):
    lhs = lhs[:, ::strides[0], ::strides[1], :]
  if precision is None and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype:
    if CPU_BACKWARD["pointwise"]:
      return _channel_dot(lhs, rhs[0, 0])
  return lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


# ----------------------------------------------------------------------------------------------
# Which formulation each kind of convolution gets, per platform: the one table to change when a
# measurement says another form is faster somewhere. `conv_general_dilated` reads it at trace time
# and lowers, through `lax.platform_dependent`, only the branch of the platform compiled for.
# "rewritten" = the formulation functions above (`_depthwise_shifted`, `_grouped_taps` with
# `_merged_groups`, `_pointwise_dot`); "native" = `lax.conv_general_dilated`. Platforms not listed
# (tpu, rocm) get the native convolution.
#
# What each entry rests on:
#   cpu, all three kinds: BENCHMARKS.md section 3 (Xception training step at batch 32, 71x71, on 2
#     cores: 4950 ms native -> about 2400 ms with the depthwise rewrite -> 1885 ms with the 1x1
#     one too; the depthwise fwd+bwd per layer 3-60x faster) and section 2b (grouped convs: the
#     step at G = 2..32 4-33x faster; at G = 64, 1.2 s where the native run was stopped after
#     10 minutes).
#   cuda, all three kinds: native, because nothing has been measured on a GPU yet. The comparison
#     is prepared: `bench/gpu_run.sh spectrum` times G = 2..64 with the grouped convs forced to
#     the rewrite, `bench/gpu_run.sh inception` Xception with its depthwise or 1x1 convs forced
#     (`conv_formulation`, the benchmark's --conv-formulation); BENCHMARKS.md section 2 gets the
#     numbers, and this table the winner per kind with a pointer to them.
# ----------------------------------------------------------------------------------------------

CONV_KINDS = ("depthwise", "grouped", "pointwise")
CONV_FORMS = ("native", "rewritten")
CONV_FORMULATIONS: dict[str, dict[str, str]] = {
    "depthwise": {"cpu": "rewritten", "cuda": "native"},
    "grouped": {"cpu": "rewritten", "cuda": "native"},
    "pointwise": {"cpu": "rewritten", "cuda": "native"},
}

_forced_formulations: dict[str, str] = {}  # set by `conv_formulation` only


def _conv_kind(feature_group_count: int, channels: int, rhs: jax.Array) -> str:
  """'depthwise', 'pointwise' (1x1, one group) or 'grouped', for a conv that has a rewrite."""
  if feature_group_count == channels:
    return "depthwise"
  if feature_group_count == 1 and rhs.shape[:2] == (1, 1):
    return "pointwise"
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
          f"in {[*CONV_FORMS, 'auto']}")
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


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
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
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if not (undilated and batch_group_count == 1 and _is_nhwc(lhs, rhs, dimension_numbers)):
    return native(lhs, rhs)
  channels = lhs.shape[-1]
  strides = tuple(window_strides)
  pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)
  if feature_group_count == channels > 1 and rhs.shape[2:] == (1, channels):
    cpu = functools.partial(_depthwise_shifted, strides=strides, pads=pads,
                            preferred_element_type=preferred_element_type)
  elif feature_group_count == 1 and rhs.shape[:2] == (1, 1):
    cpu = functools.partial(_pointwise_dot, strides=strides, pads=pads, precision=precision,
                            preferred_element_type=preferred_element_type)
  elif 1 < feature_group_count < channels and rhs.shape[2] * feature_group_count == channels:
    cpu = functools.partial(_grouped_taps, strides=strides, pads=pads,
                            groups=feature_group_count, precision=precision,
                            preferred_element_type=preferred_element_type)
  else:
    return native(lhs, rhs)
  kind = _conv_kind(feature_group_count, channels, rhs)
  forced = _forced_formulations.get(kind)
  if forced is not None:  # `conv_formulation(...)`: the same form on every platform
    return (cpu if forced == "rewritten" else native)(lhs, rhs)
  rewritten_on = {platform: cpu for platform, form in CONV_FORMULATIONS[kind].items()
                  if form == "rewritten"}
  if not rewritten_on:
    return native(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, **rewritten_on, default=native)


def _first_max(xp: jax.Array, window: Sequence[int], strides: Sequence[int],
               out_hw: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Max over each window of xp and the first kernel offset (row-major) that reaches it (int8)."""
  windows = [w for _, w in _window_slices(xp, window, strides, out_hw)]
  y = functools.reduce(jnp.maximum, windows)
  first = jnp.full(y.shape, len(windows) - 1, jnp.int8)
  for t in range(len(windows) - 2, -1, -1):
    first = jnp.where(windows[t] == y, jnp.int8(t), first)
  return y, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_vjp(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return _max_pool_fwd(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads):
  xp = _pad_nhwc(x, -jnp.inf, pads)
  out_hw = [(xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(2)]
  y, first = _first_max(xp, window, strides, out_hw)
  return y, (first, x.shape)


def _max_pool_bwd(window, strides, pads, residuals, g):
  """Routes each output gradient to its window's first maximum, as select_and_scatter does.

  Written per stride phase to avoid interior padding: padded input position s * q + r receives,
  from every kernel offset t = s * m + r, the gradient of output q - m where that offset won.
  The s x s phase planes are summed from unit-stride shifted pads, then interleaved.
  """
  first, x_shape = residuals
  (sh, sw), (ho, wo) = strides, g.shape[1:3]
  hp, wp = (x_shape[1 + d] + sum(pads[d]) for d in range(2))
  qh, qw = -(-hp // sh), -(-wp // sw)
  acc = jnp.promote_types(g.dtype, jnp.float32)
  zero = jnp.zeros((), acc)
  planes = {}
  for t, (i, j) in enumerate((i, j) for i in range(window[0]) for j in range(window[1])):
    contribution = jnp.where(first == t, g.astype(acc), zero)
    (mi, ri), (mj, rj) = divmod(i, sh), divmod(j, sw)
    shifted = lax.pad(contribution, zero, [(0, 0, 0), (mi, qh - ho - mi, 0),
                                           (mj, qw - wo - mj, 0), (0, 0, 0)])
    planes[ri, rj] = shifted + planes[ri, rj] if (ri, rj) in planes else shifted
  b, c = g.shape[0], g.shape[3]
  empty = jnp.zeros((b, qh, qw, c), acc)
  stacked = jnp.stack([jnp.stack([planes.get((ri, rj), empty) for rj in range(sw)], axis=3)
                       for ri in range(sh)], axis=2)  # [b, qh, sh, qw, sw, c]
  gxp = stacked.reshape(b, qh * sh, qw * sw, c)
  gx = lax.slice(gxp, (0, pads[0][0], pads[1][0], 0),
                 (b, pads[0][0] + x_shape[1], pads[1][0] + x_shape[2], c))
  return (gx.astype(g.dtype),)


_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: str | Sequence[tuple[int, int]]) -> jax.Array:
  """`nn.max_pool` of an NHWC array, with a backward pass that is fast on CPU.

  XLA:CPU expands max pooling's backward (select_and_scatter) into a variadic reduce-window that
  tracks four int32 index arrays of the input's size, and a scatter (BENCHMARKS.md, section 6).
  On CPU the forward pass here also records, per output, which kernel offset held the (first)
  maximum, in int8, and the backward pass routes the gradient with shifted pads
  (`_max_pool_bwd`); the values and gradients are those of `nn.max_pool`, ties included. GPU
  and TPU keep `nn.max_pool` (`lax.platform_dependent` lowers only their branch).
  """
  window, strides = tuple(window), tuple(strides)
  native = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating) or not CPU_BACKWARD["max_pool"]:
    return native(x)
  pads = tuple(tuple(p) for p in _explicit_padding(padding, x.shape[1:3], window, strides))
  cpu = functools.partial(_max_pool_vjp, window=window, strides=strides, pads=pads)
  with jax.named_scope("max_pool"):  # names its ops in profiles (bench/profile_step.py)
    return lax.platform_dependent(x, cpu=cpu, default=native)


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

    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kernel_init,
                             conv_general_dilated=conv_general_dilated)
    spatial = conv(spatial_channels, (self.kernel_size, self.kernel_size), padding="SAME",
                   feature_group_count=segments, name="spatial")
    pointwise = conv(self.features, (1, 1), padding="VALID", name="pointwise")
    activation = ACTIVATIONS[self.mid_activation]

    x = spatial(x) if depthwise_first else pointwise(x)
    if activation is not None:
      x = activation(x)
    return pointwise(x) if depthwise_first else spatial(x)
