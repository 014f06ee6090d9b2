"""The CPU backward passes of batch norm and max pooling, in closed form.

The backward passes XLA:CPU derives for batch norm and max pooling materialise shifted copies,
transposes and index arrays of the activations (max pooling's select_and_scatter becomes a
variadic reduce-window over four int32 index arrays and a scatter). These compute the same
gradients with two per-channel sums and one elementwise pass (batch norm) and with the winning
kernel offset recorded in int8 in the forward pass (max pooling). `layers` picks them per platform
(`layers.BatchNorm`, `layers.max_pool`), so GPU and TPU programs keep the native ops; what each
gained: BENCHMARKS.md, "CPU: ours against PyTorch/timm".
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp

from xception_jax.models.cpu_kernels import pad_nhwc
from xception_jax.models.cpu_kernels import window_slices


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


def batch_norm_native(x, scale, bias, epsilon, dtype):
  mean, var = _batch_norm_stats(x)
  return _batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_vjp(x, scale, bias, epsilon, dtype):
  return batch_norm_native(x, scale, bias, epsilon, dtype)


def _batch_norm_fwd(x, scale, bias, epsilon, dtype):
  mean, var = _batch_norm_stats(x)
  y = _batch_norm_apply(x, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var), (x, mean, var, scale)


def batch_norm_bwd(epsilon, dtype, residuals, cotangents):
  """The batch-norm gradient in closed form: two per-channel sums over (g, x) and one
  elementwise pass. Also exact for cotangents of the returned mean and variance."""
  del dtype
  # As in `cpu_kernels._depthwise_bwd`: no x - mean shared with (and materialised by) the forward pass.
  x, mean, var, scale = lax.optimization_barrier(residuals)
  g, g_mean, g_var = cotangents
  acc = mean.dtype
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  inv = lax.rsqrt(var + epsilon)
  xf, g = x.astype(acc), g.astype(acc)
  sum_g, sum_gc = jnp.sum(g, axes), jnp.sum(g * (xf - mean), axes)
  # var = max(0, E[x^2] - E[x]^2): dvar/dx = 2 (x - mean) / n where not clipped, else 0.
  d_var = (g_var - 0.5 * scale * inv**3 * sum_gc) * (var > 0)
  d_mean = g_mean - inv * scale * sum_g
  # grad_x = g * inv * scale + d_mean / n + (x - mean) * 2 d_var / n, written affine in x so
  # that no x - mean array is shared with (and materialised for) the sum above.
  slope = 2.0 * d_var / n
  grad_x = g * (inv * scale) + xf * slope + (d_mean / n - mean * slope)
  return (grad_x.astype(x.dtype), (sum_gc * inv).astype(scale.dtype), sum_g.astype(scale.dtype))


batch_norm_vjp.defvjp(_batch_norm_fwd, batch_norm_bwd)


def _first_max(
  xp: jax.Array, window: Sequence[int], strides: Sequence[int], out_hw: Sequence[int]
) -> tuple[jax.Array, jax.Array]:
  """Max over each window of xp and the first kernel offset (row-major) that reaches it (int8)."""
  windows = [w for _, w in window_slices(xp, window, strides, out_hw)]
  y = functools.reduce(jnp.maximum, windows)
  first = jnp.full(y.shape, len(windows) - 1, jnp.int8)
  for t in range(len(windows) - 2, -1, -1):
    first = jnp.where(windows[t] == y, jnp.int8(t), first)
  return y, first


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_vjp(
  x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
) -> jax.Array:
  return _max_pool_fwd(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads):
  xp = pad_nhwc(x, -jnp.inf, pads)
  out_hw = [(xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(2)]
  y, first = _first_max(xp, window, strides, out_hw)
  return y, (first, x.shape)


def max_pool_bwd(window, strides, pads, residuals, g):
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
    shifted = lax.pad(
      contribution, zero, [(0, 0, 0), (mi, qh - ho - mi, 0), (mj, qw - wo - mj, 0), (0, 0, 0)]
    )
    planes[ri, rj] = shifted + planes[ri, rj] if (ri, rj) in planes else shifted
  b, c = g.shape[0], g.shape[3]
  empty = jnp.zeros((b, qh, qw, c), acc)
  stacked = jnp.stack(
    [jnp.stack([planes.get((ri, rj), empty) for rj in range(sw)], axis=3) for ri in range(sh)],
    axis=2,
  )  # [b, qh, sh, qw, sw, c]
  gxp = stacked.reshape(b, qh * sh, qw * sw, c)
  gx = lax.slice(
    gxp, (0, pads[0][0], pads[1][0], 0), (b, pads[0][0] + x_shape[1], pads[1][0] + x_shape[2], c)
  )
  return (gx.astype(g.dtype),)


max_pool_vjp.defvjp(_max_pool_fwd, max_pool_bwd)
