"""The CPU formulations: convolutions as products, and hand-written backward passes.

XLA:CPU runs the depthwise 3x3 convolution (above all its two backward convolutions), grouped
convolutions and the kernel gradients of 1x1 and regular convolutions far below the machine's
rate. These functions compute the same values in forms XLA:CPU runs well (shifted multiply-adds,
group-batched matrix products, matrix products over channels or kernel rows); the batch-norm and
max-pool backward passes are in `cpu_norm_pool`. `layers` picks them per platform with
`lax.platform_dependent` (the table `layers.CONV_FORMULATIONS`), so GPU and TPU programs keep the
native ops. What each one gained, and what was tried and dropped: BENCHMARKS.md, sections 3, 2b
and "CPU: ours against PyTorch/timm".
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

# Which hand-written CPU backward passes are used (the rest differentiate automatically); for
# measuring each against XLA's own derivative (BENCHMARKS.md, "CPU: ours against PyTorch/timm").
CPU_BACKWARD = {
  "depthwise": True,
  "pointwise": True,
  "regular": True,
  "batch_norm": True,
  "max_pool": True,
}


_NHWC = ("NHWC", "HWIO", "NHWC")


def is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  """True when `dimension_numbers` means NHWC inputs / HWIO kernels / NHWC outputs.

  Flax's `nn.Conv` passes a `ConvDimensionNumbers` of index permutations for NHWC; compare on
  that canonical form so strings and tuples given by other callers are recognised too.
  """
  if lhs.ndim != 4 or rhs.ndim != 4 or dimension_numbers is None:
    return False
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return canonical == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def explicit_padding(
  padding: str | Sequence[tuple[int, int]],
  in_shape: Sequence[int],
  window: Sequence[int],
  strides: Sequence[int],
) -> list[tuple[int, int]]:
  """(low, high) pads per spatial dim; "SAME" puts the odd extra pixel at the end, as TF does."""
  if isinstance(padding, str):
    return [tuple(p) for p in lax.padtype_to_pads(in_shape, window, strides, padding)]
  return [tuple(p) for p in padding]


def pad_nhwc(x: jax.Array, value: Any, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """lax.pad of the two spatial dims of an NHWC array (negative pads crop, as in lax.pad)."""
  return lax.pad(x, jnp.array(value, x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])


def window_slices(
  xp: jax.Array, window: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]
):
  """Yields ((i, j), slice) for every kernel offset: xp[:, i::sh, j::sw][:, :Ho, :Wo]."""
  (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
  b, _, _, c = xp.shape
  for i in range(kh):
    for j in range(kw):
      end = (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c)
      yield (i, j), lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _shifted_products(
  xp: jax.Array, taps: jax.Array, strides: Sequence[int], out_hw: Sequence[int], acc: Any
) -> jax.Array:
  """sum over kernel offsets (i, j) of xp[:, i::sh, j::sw][:, :Ho, :Wo] * taps[i, j], in acc."""
  out = None
  for (i, j), window in window_slices(xp, taps.shape[:2], strides, out_hw):
    term = window.astype(acc) * taps[i, j].astype(acc)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_vjp(
  lhs: jax.Array,
  rhs: jax.Array,
  strides: tuple[int, ...],
  pads: tuple[tuple[int, int], ...],
  out_dtype: Any,
) -> jax.Array:
  return _depthwise_fwd(lhs, rhs, strides, pads, out_dtype)[0]


def _depthwise_fwd(lhs, rhs, strides, pads, out_dtype):
  kh, kw = rhs.shape[:2]
  xp = pad_nhwc(lhs, 0, pads)
  out_hw = [(xp.shape[1 + d] - (kh, kw)[d]) // strides[d] + 1 for d in range(2)]
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  # The padded input is the residual: XLA materialises it for the forward pass anyway, and the
  # backward pass then slices a buffer instead of padding again.
  return _shifted_products(xp, rhs[:, :, 0], strides, out_hw, acc).astype(out_dtype), (xp, rhs)


# The kernel gradient sums at most this many images per fused loop (`_window_sums`).
KERNEL_GRAD_IMAGES = 32


def _window_sums(
  xp: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int], acc: Any
) -> jax.Array:
  """[kh * kw, C]: per kernel offset, the sum over batch and pixels of shifted window x g.

  XLA:CPU emits reductions as scalar loops unless YNNPACK takes them, and YNNPACK takes only
  reductions of unsliced inputs: nine `sum(window * g)` each copied a shifted slice of the
  activation first, and one variadic reduction of the nine products ran as one scalar loop.
  Here the batch is summed first with elementwise adds, image by image (one vectorised loop
  over [offsets, H, W, C] that reads the activation and its gradient once), and only the
  remaining pixel sums, of a plain array, are reductions (BENCHMARKS.md, section 7).
  """
  windows = [w for _, w in window_slices(xp, window, strides, g.shape[1:3])]
  # The data-parallel step shards the batch over the devices: viewed as [shards, images per
  # shard, ...], the image-by-image slices below stay within a shard (slicing the sharded batch
  # axis itself made the SPMD partitioner move whole images between devices).
  shards = math.gcd(g.shape[0], jax.device_count())
  per_shard = g.shape[0] // shards
  if shards > 1:
    g, *windows = [a.reshape(shards, per_shard, *a.shape[1:]) for a in (g, *windows)]
  image = (lambda a, k: a[:, k]) if shards > 1 else (lambda a, k: a[k])
  total = None
  for start in range(0, per_shard, KERNEL_GRAD_IMAGES):
    images = range(start, min(start + KERNEL_GRAD_IMAGES, per_shard))
    g_acc = [image(g, k).astype(acc) for k in images]
    per_offset = jnp.stack(
      [
        functools.reduce(jnp.add, [image(w, k).astype(acc) * g_k for k, g_k in zip(images, g_acc)])
        for w in windows
      ]
    )  # [offsets, (shards,) H, W, C]
    part = jnp.sum(per_offset, axis=tuple(range(1, per_offset.ndim - 1)))
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
  g_pads = [
    (
      (kh, kw)[d] - 1 - pads[d][0],
      in_hw[d] + pads[d][0] - (out_hw[d] - 1) * strides[d] - 1,
      strides[d] - 1,
    )
    for d in range(2)
  ]
  gp = lax.pad(g, jnp.array(0, g.dtype), [(0, 0, 0), *g_pads, (0, 0, 0)])
  grad_lhs = _shifted_products(gp, rhs[::-1, ::-1, 0], (1, 1), in_hw, acc).astype(xp.dtype)
  grad_rhs = _window_sums(xp, g, (kh, kw), strides, acc).reshape(rhs.shape).astype(rhs.dtype)
  return grad_lhs, grad_rhs


_depthwise_vjp.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_shifted(
  lhs: jax.Array,
  rhs: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  preferred_element_type: Any,
) -> jax.Array:
  """Depthwise conv (rhs (kh, kw, 1, C)) as a sum over kernel offsets of shifted slices x row.

  Elementwise ops that XLA:CPU fuses into one loop over the output, with a backward made of
  pads, slices and reductions, instead of the grouped-convolution kernels it runs slowly.
  The backward pass is written by hand (`_depthwise_bwd`): differentiated automatically, the
  forward pass kept its nine shifted slices as materialised residuals, nine extra copies of the
  activation per layer (BENCHMARKS.md, section 7).
  Accumulates in float32 (bf16 inputs round once, at the end) and returns the input dtype.
  """
  if not CPU_BACKWARD["depthwise"]:
    return _depthwise_fwd(
      lhs,
      rhs,
      tuple(strides),
      tuple(tuple(p) for p in pads),
      jnp.dtype(preferred_element_type or lhs.dtype),
    )[0]
  return _depthwise_vjp(
    lhs,
    rhs,
    tuple(strides),
    tuple(tuple(p) for p in pads),
    jnp.dtype(preferred_element_type or lhs.dtype),
  )


# On CPU, groups narrower than this are merged into block-diagonal groups of at most this many
# input channels (`merged_groups`); wider groups are computed as they are.
_MIN_BLOCK_CHANNELS = 32


def merged_groups(rhs: jax.Array, groups: int) -> tuple[jax.Array, int]:
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
  k = max(
    n
    for n in range(1, groups + 1)
    if groups % n == 0 and n * group_in <= max(_MIN_BLOCK_CHANNELS, group_in)
  )
  if k == 1:
    return rhs, groups
  d = out_channels // groups
  kernel = rhs.reshape(kh, kw, group_in, groups // k, k, d)
  block_diagonal = jnp.einsum("hwigao,ab->hwaigbo", kernel, jnp.eye(k, dtype=rhs.dtype))
  return block_diagonal.reshape(kh, kw, k * group_in, out_channels), groups // k


def grouped_taps(
  lhs: jax.Array,
  rhs: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  groups: int,
  precision: Any,
  preferred_element_type: Any,
) -> jax.Array:
  """Grouped conv (rhs (kh, kw, C / groups, C_out)) as a sum over kernel offsets of one
  group-batched matrix product each: [groups, pixels, C / groups] x [groups, C / groups, d].

  XLA:CPU runs a convolution with 1 < feature_group_count < channels (the spectrum's
  intermediate segment counts) far below the rate of the same work as batched matrix products:
  the Xception training step at 8 segments took 20x the regular-conv step, rising with the
  segment count (BENCHMARKS.md, section 2b). Groups narrower than `_MIN_BLOCK_CHANNELS` are
  merged first (`merged_groups`). Accumulates in float32, returns the input dtype.
  """
  rhs, groups = merged_groups(rhs, groups)
  kh, kw, group_in, out_channels = rhs.shape
  d = out_channels // groups
  xp = pad_nhwc(lhs, 0, pads)
  b = lhs.shape[0]
  ho, wo = [(xp.shape[1 + k] - (kh, kw)[k]) // strides[k] + 1 for k in range(2)]
  kernel = rhs.reshape(kh, kw, group_in, groups, d)
  acc = jnp.promote_types(lhs.dtype, jnp.float32)
  out = None  # [groups, b, ho, wo, d]: dot_general puts the batch (group) dimension first
  for (i, j), window in window_slices(xp, (kh, kw), strides, (ho, wo)):
    term = lax.dot_general(
      window.reshape(b, ho, wo, groups, group_in),
      kernel[i, j],
      (((4,), (0,)), ((3,), (1,))),
      precision=precision,
      preferred_element_type=acc,
    )
    out = term if out is None else out + term
  out = jnp.moveaxis(out, 0, 3).reshape(b, ho, wo, out_channels)
  return out.astype(preferred_element_type or lhs.dtype)


def _kernel_grad_by_rows(
  xp: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int], acc: Any
) -> jax.Array:
  """[kh, kw, C, C_out]: the kernel gradient of a one-group conv of the padded input xp, as kh
  matrix products over the batch and pixels.

  The kw horizontal offsets are gathered once into channels (P[b, y, x, j * C + c] = xp[b, y,
  sw * x + j, c]: one concatenation of kw column-shifted slices, which XLA:CPU writes at memory
  speed), and each kernel row i is then one product P[:, i::sh][:, :Ho]^T @ g of shape [kw * C,
  C_out]. The 9-way concatenation of a full im2col, by contrast, ran at a tenth of that speed.
  """
  (kh, kw), (sh, sw) = window, strides
  ho, wo, c_out = g.shape[1:]
  hp, c = xp.shape[1], xp.shape[3]
  columns = [w for _, w in window_slices(xp, (1, kw), (1, sw), (hp, wo))]
  p = columns[0] if kw == 1 else jnp.concatenate(columns, axis=-1)  # [b, hp, wo, kw * c]
  rows = [
    lax.dot_general(p_i, g, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=acc)
    for _, p_i in window_slices(p, (kh, 1), (sh, 1), (ho, wo))
  ]
  return jnp.stack(rows).reshape(kh, kw, c, c_out)


def _native_padded(xp, rhs, strides, out_dtype):
  return lax.conv_general_dilated(
    xp, rhs, strides, "VALID", dimension_numbers=_NHWC, preferred_element_type=out_dtype
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _regular_vjp(
  xp: jax.Array, rhs: jax.Array, strides: tuple[int, ...], out_dtype: Any
) -> jax.Array:
  return _native_padded(xp, rhs, strides, out_dtype)


def _regular_fwd(xp, rhs, strides, out_dtype):
  return _native_padded(xp, rhs, strides, out_dtype), (xp, rhs)


def _regular_bwd(strides, out_dtype, residuals, g):
  """Input gradient: XLA's own (a convolution XLA:CPU runs fast); kernel gradient: per kernel
  row, one matrix product (`_kernel_grad_by_rows`) instead of XLA:CPU's backward-filter
  convolution, which took 350 ms of the 71x71 Xception step's 1.9 s for block1_conv2 alone
  (BENCHMARKS.md, section 7)."""
  xp, rhs = lax.optimization_barrier(residuals)
  _, input_vjp = jax.vjp(lambda x: _native_padded(x, rhs, strides, out_dtype), xp)
  (grad_xp,) = input_vjp(g)
  acc = jnp.promote_types(xp.dtype, jnp.float32)
  grad_rhs = _kernel_grad_by_rows(xp, g, rhs.shape[:2], strides, acc)
  return grad_xp, grad_rhs.astype(rhs.dtype)


_regular_vjp.defvjp(_regular_fwd, _regular_bwd)


def regular_rows(
  lhs: jax.Array,
  rhs: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  preferred_element_type: Any,
) -> jax.Array:
  """A one-group convolution with a kernel larger than 1x1 (rhs (kh, kw, C, C_out)): XLA's
  forward pass and input gradient, with the kernel gradient as kh matrix products
  (`_kernel_grad_by_rows`). The stem's 3x3 convolutions, the spectrum's G = 1 layers and
  Inception's regular convolutions. Returns `preferred_element_type` or the input dtype."""
  xp = pad_nhwc(lhs, 0, pads) if any(p != (0, 0) for p in pads) else lhs
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  if not CPU_BACKWARD["regular"]:
    return _native_padded(xp, rhs, tuple(strides), out_dtype)
  return _regular_vjp(xp, rhs, tuple(strides), out_dtype)


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
  writes were about a tenth of the training step (BENCHMARKS.md, section 7).
  """
  x, w = residuals
  grad_x = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  grad_w = lax.dot_general(
    x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ()))
  )
  return grad_x, grad_w


_channel_dot.defvjp(_channel_dot_fwd, _channel_dot_bwd)


def pointwise_dot(
  lhs: jax.Array,
  rhs: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
  precision: Any,
  preferred_element_type: Any,
) -> jax.Array:
  """1x1 conv as a matrix product over channels (on the strided, padded input when needed).

  XLA:CPU computes the weight gradient of a 1x1 convolution about 2x slower than the same
  contraction written as a dot_general. Without `precision` or `preferred_element_type`
  (Flax passes neither) the product is `_channel_dot`, whose gradients are explicit 2-D products.
  """
  if any(p != (0, 0) for p in pads):
    lhs = pad_nhwc(lhs, 0, pads)
  if tuple(strides) != (1, 1):
    lhs = lhs[:, :: strides[0], :: strides[1], :]
  if precision is None and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype:
    if CPU_BACKWARD["pointwise"]:
      return _channel_dot(lhs, rhs[0, 0])
  return lax.dot_general(
    lhs,
    rhs[0, 0],
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
