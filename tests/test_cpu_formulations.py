"""The CPU formulations of models/layers.py compute what the native ops compute.

On CPU, `layers.conv_general_dilated` replaces depthwise convolutions by shifted multiply-adds,
grouped ones by group-batched matrix products and 1x1 convolutions by a matrix product, because
XLA:CPU runs the native forms (above all their backward passes) slowly.
These tests pin down that the swap is invisible: forward values and gradients match the native
ops (fp32 tightly, bf16 loosely) for odd and even sizes, SAME padding with its extra pixel at the
end, and stride 2 (the 1x1 shortcuts); that the CPU branch is the one compiled on CPU and the
native one is what a GPU / TPU program gets; and that the parameters keep their names and shapes.
"""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax.models import cpu_kernels
from xception_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _native_conv(x, w, strides, padding, groups):
  return lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=NHWC, feature_group_count=groups
  )


def _ours_conv(x, w, strides, padding, groups):
  return layers.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=NHWC, feature_group_count=groups
  )


def _value_and_grads(conv, x, w, cotangent):
  """conv(x, w) and the gradients of <conv(x, w), cotangent> wrt x and w, in float32."""

  def loss(x, w):
    return jnp.sum(conv(x, w).astype(jnp.float32) * cotangent)

  y = jax.jit(conv)(x, w)
  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  return [np.asarray(a, np.float32) for a in (y, gx, gw)]


def _assert_close(ours, native, dtype, names=("value", "grad x", "grad kernel")):
  """Close relative to each array's largest magnitude: fp32 to rounding, bf16 to its 8 bits."""
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=5e-2, atol=5e-2)
  for name, a, b in zip(names, ours, native):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a / scale, b / scale, err_msg=name, **tol)


# (input shape, kernel shape, strides, padding, feature groups): depthwise 3x3 (SAME, odd and
# even sizes, and a strided one although Xception has none), 1x1 at stride 1 and 2 (SAME on odd
# and even sizes, and VALID).
CONVS = [
  ((2, 7, 7, 8), (3, 3, 1, 8), (1, 1), "SAME", 8),
  ((2, 8, 6, 16), (3, 3, 1, 16), (1, 1), "SAME", 16),
  ((2, 8, 7, 8), (3, 3, 1, 8), (2, 2), "SAME", 8),
  ((2, 7, 7, 8), (1, 1, 8, 12), (1, 1), "SAME", 1),
  ((2, 7, 7, 8), (1, 1, 8, 12), (2, 2), "SAME", 1),
  ((2, 8, 6, 8), (1, 1, 8, 12), (2, 2), "SAME", 1),
  ((2, 9, 8, 8), (1, 1, 8, 12), (2, 2), "VALID", 1),
  ((2, 7, 7, 8), (3, 3, 2, 8), (1, 1), "SAME", 4),  # grouped: the spectrum's middle
  ((2, 8, 6, 12), (3, 3, 6, 12), (1, 1), "SAME", 2),
  ((2, 8, 7, 8), (3, 3, 4, 8), (2, 2), "SAME", 2),
  # Narrow groups merged into block-diagonal ones: 20 groups of 4 -> 4 blocks of 20 (also
  # strided), 16 groups of 4 in / 2 out -> 2 blocks; and 2 groups of 48, too wide to merge.
  ((1, 5, 5, 80), (3, 3, 4, 80), (1, 1), "SAME", 20),
  ((1, 6, 5, 80), (3, 3, 4, 80), (2, 2), "SAME", 20),
  ((1, 5, 5, 64), (3, 3, 4, 32), (1, 1), "SAME", 16),
  ((1, 5, 5, 96), (3, 3, 48, 96), (1, 1), "SAME", 2),
  # Regular convs (one group): the stem's 3x3 VALID at strides 2 and 1, SAME on even sizes,
  # Inception's 1x7 / 7x1 and a strided 5x5.
  ((2, 9, 9, 3), (3, 3, 3, 8), (2, 2), "VALID", 1),
  ((2, 7, 8, 8), (3, 3, 8, 12), (1, 1), "VALID", 1),
  ((2, 8, 6, 8), (3, 3, 8, 8), (1, 1), "SAME", 1),
  ((1, 9, 9, 8), (1, 7, 8, 8), (1, 1), "SAME", 1),
  ((1, 9, 9, 8), (7, 1, 8, 8), (1, 1), "SAME", 1),
  ((1, 10, 9, 4), (5, 5, 4, 8), (2, 2), "SAME", 1),
]


@pytest.mark.parametrize(
  "w_shape,groups,merged",
  [
    ((3, 3, 4, 80), 20, (4, (3, 3, 20, 80))),  # k = 5: the largest divisor of 20 with 4k <= 32
    ((3, 3, 4, 32), 16, (2, (3, 3, 32, 32))),
    ((3, 3, 2, 256), 128, (8, (3, 3, 32, 256))),
    ((3, 3, 48, 96), 2, (2, (3, 3, 48, 96))),  # already wide: unchanged
  ],
)
def test_narrow_groups_merge_into_block_diagonal_kernels(w_shape, groups, merged):
  w = _normal(0, w_shape)
  kernel, blocks = cpu_kernels.merged_groups(w, groups)
  assert (blocks, kernel.shape) == merged
  # Block g of the merged kernel holds its k original groups on the diagonal, zeros elsewhere.
  k, group_in, d = groups // blocks, w_shape[2], w_shape[3] // groups
  for g in (0, groups - 1):
    block, a = divmod(g, k)
    rows = slice(a * group_in, (a + 1) * group_in)
    cols = slice(g * d, (g + 1) * d)
    np.testing.assert_array_equal(kernel[:, :, rows, cols], w[:, :, :, cols])
    assert float(
      jnp.abs(kernel[:, :, rows, block * k * d : (block + 1) * k * d]).sum()
    ) == pytest.approx(float(jnp.abs(w[:, :, :, cols]).sum()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_shape,w_shape,strides,padding,groups", CONVS)
def test_conv_matches_native(x_shape, w_shape, strides, padding, groups, dtype):
  x, w = _normal(0, x_shape, dtype), _normal(1, w_shape, dtype)
  out_shape = _native_conv(x, w, strides, padding, groups).shape
  cotangent = _normal(2, out_shape)
  ours = _value_and_grads(
    functools.partial(_ours_conv, strides=strides, padding=padding, groups=groups), x, w, cotangent
  )
  native = _value_and_grads(
    functools.partial(_native_conv, strides=strides, padding=padding, groups=groups),
    x,
    w,
    cotangent,
  )
  assert ours[0].shape == native[0].shape == out_shape
  _assert_close(ours, native, dtype)


def _lowered_ops(fn, platform, *args):
  return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def test_cpu_program_uses_rewrites_and_other_platforms_keep_native_ops():
  x, w = _normal(0, (2, 9, 9, 8), jnp.bfloat16), _normal(1, (3, 3, 1, 8), jnp.bfloat16)
  w1 = _normal(2, (1, 1, 8, 16), jnp.bfloat16)

  def loss(x, w, w1):
    y = _ours_conv(_ours_conv(x, w, (1, 1), "SAME", 8), w1, (2, 2), "SAME", 1)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  step = jax.grad(loss, argnums=(0, 1, 2))
  assert "convolution" not in _lowered_ops(step, "cpu", x, w, w1)
  for platform in ("cuda", "tpu"):
    assert "convolution" in _lowered_ops(step, platform, x, w, w1), platform


def test_regular_convs_keep_native_forward_and_rewrite_kernel_gradient_on_cpu_only():
  """Regular (one-segment) 3x3 convs keep the native forward pass and input gradient on CPU too,
  with the kernel gradient as matrix products there (GPU and TPU: three native convolutions);
  grouped ones are rewritten on CPU but stay native on GPU and TPU."""
  x = _normal(0, (1, 6, 6, 8))
  w = _normal(1, (3, 3, 8, 8))
  regular = lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 1)
  grads = jax.grad(lambda x, w: jnp.sum(regular(x, w) ** 2), argnums=(0, 1))
  assert _lowered_ops(grads, "cpu", x, w).count("stablehlo.convolution") == 2
  assert "dot_general" in _lowered_ops(grads, "cpu", x, w)
  for platform in ("cuda", "tpu"):
    ops = _lowered_ops(grads, platform, x, w)
    assert ops.count("stablehlo.convolution") == 3 and "dot_general" not in ops, platform
  grouped = lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 4)
  w4 = _normal(1, (3, 3, 2, 8))
  assert "convolution" not in _lowered_ops(grouped, "cpu", x, w4)
  assert "convolution" in _lowered_ops(grouped, "cuda", x, w4)
  # Called eagerly (not traced), every kind is the native op itself: one op instead of a
  # branch per platform compiled op by op (an un-jitted model.init).
  np.testing.assert_array_equal(grouped(x, w4), _native_conv(x, w4, (1, 1), "SAME", 4))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
@pytest.mark.parametrize("segments", ["depthwise", 4])
def test_separable_conv_params_values_and_grads_match_native(segments, order, dtype):
  """Same parameter tree as before (names and shapes); same outputs and parameter gradients as
  the module built from native `nn.Conv`s, under jit and grad, in fp32 and bf16 compute."""
  x = _normal(5, (2, 7, 7, 8))
  module = layers.SeparableConv(16, segments=segments, order=order, dtype=dtype)
  params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  spatial = 8 if order == "depthwise_first" else 16
  groups = spatial if segments == "depthwise" else segments
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {
    "spatial": {"kernel": (3, 3, spatial // groups, spatial)},
    "pointwise": {"kernel": (1, 1, 8, 16)},
  }
  params = jax.tree.map(lambda a, s=iter(range(10, 20)): _normal(next(s), a.shape), params)  # noqa: B008
  cotangent = _normal(7, (2, 7, 7, 16))

  def native(p, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
    sp = conv(spatial, (3, 3), padding="SAME", feature_group_count=groups)
    pw = conv(16, (1, 1), padding="VALID")
    if order == "depthwise_first":
      return pw.apply({"params": p["pointwise"]}, sp.apply({"params": p["spatial"]}, x))
    return sp.apply({"params": p["spatial"]}, pw.apply({"params": p["pointwise"]}, x))

  def ours(p, x):
    return module.apply({"params": p}, x)

  results = []
  for fn in (ours, native):
    y = jax.jit(fn)(params, x)
    g = jax.jit(jax.grad(lambda p, fn=fn: jnp.sum(fn(p, x).astype(jnp.float32) * cotangent)))(
      params
    )
    assert y.dtype == dtype
    results.append([np.asarray(y, np.float32), *(np.asarray(a) for a in jax.tree.leaves(g))])
  _assert_close(
    results[0], results[1], dtype, names=("value", "grad pointwise/kernel", "grad spatial/kernel")
  )


# Max pooling: (input shape, window, strides, padding). Xception's 3x3 / 2 SAME on odd and even
# sizes (SAME's extra pixel at the end), VALID, stride 1 and a 2x2 window.
POOLS = [
  ((2, 7, 7, 4), (3, 3), (2, 2), "SAME"),
  ((2, 8, 6, 4), (3, 3), (2, 2), "SAME"),
  ((2, 9, 8, 4), (3, 3), (2, 2), "VALID"),
  ((1, 6, 5, 4), (3, 3), (1, 1), "SAME"),
  ((1, 6, 7, 4), (2, 2), (2, 2), "VALID"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("x_shape,window,strides,padding", POOLS)
def test_max_pool_matches_native(x_shape, window, strides, padding, dtype):
  """Same values as nn.max_pool; the gradient goes where select_and_scatter sends it, to the
  first maximum of each window when several are equal (small integers make many ties)."""
  x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, x_shape), dtype)
  native = functools.partial(nn.max_pool, window_shape=window, strides=strides, padding=padding)
  ours = functools.partial(layers.max_pool, window=window, strides=strides, padding=padding)
  y_native = jax.jit(native)(x)
  cotangent = _normal(3, y_native.shape)
  grads = [
    jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x).astype(jnp.float32) * cotangent)))(x)
    for f in (ours, native)
  ]
  np.testing.assert_array_equal(
    np.asarray(jax.jit(ours)(x), np.float32), np.asarray(y_native, np.float32)
  )
  assert grads[0].dtype == dtype
  _assert_close(
    [np.asarray(g, np.float32) for g in grads[:1]],
    [np.asarray(g, np.float32) for g in grads[1:]],
    dtype,
    names=("grad x",),
  )


def test_max_pool_backward_is_rewritten_on_cpu_only():
  x = _normal(0, (2, 9, 9, 4), jnp.bfloat16)

  def step():  # a new function each time: the formulation is chosen when it is traced
    return jax.grad(
      lambda x: jnp.sum(layers.max_pool(x, (3, 3), (2, 2), "SAME").astype(jnp.float32) ** 2)
    )

  assert "stablehlo.select_and_scatter" not in _lowered_ops(step(), "cpu", x)
  for platform in ("cuda", "tpu"):
    assert "stablehlo.select_and_scatter" in _lowered_ops(step(), platform, x), platform
  # Forced either way on every platform, for measuring (tools/benchmark.py --conv_formulation).
  with layers.conv_formulation("max_pool=rewritten"):
    assert "stablehlo.select_and_scatter" not in _lowered_ops(step(), "cuda", x)
  with layers.conv_formulation("max_pool=native"):
    assert "stablehlo.select_and_scatter" in _lowered_ops(step(), "cpu", x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_scale", [True, False], ids=["scale", "no_scale"])
def test_batch_norm_training_matches_flax(use_scale, dtype):
  """Training-mode batch norm: Flax's outputs and updated statistics, bit for bit, and its
  gradients (input, scale, bias) to rounding; evaluation mode is Flax's code unchanged."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 5, 3, 8)) * 3 + 1, dtype)
  kwargs = dict(dtype=dtype, use_scale=use_scale, momentum=0.99, epsilon=1e-3)
  ours, flax_bn = layers.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
  seeds = iter(range(20, 40))
  variables = jax.tree.map(lambda a: a + 0.1 * _normal(next(seeds), a.shape), variables)
  assert jax.tree.map(
    jnp.shape, ours.init(jax.random.key(0), x, use_running_average=False)
  ) == jax.tree.map(jnp.shape, variables)
  cotangent = _normal(7, x.shape)
  results = []
  for module in (ours, flax_bn):

    def loss(params, x, module=module):
      y, updated = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]},
        x,
        use_running_average=False,
        mutable=["batch_stats"],
      )
      return jnp.sum(y.astype(jnp.float32) * cotangent), (y, updated)

    (_, (y, updated)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      variables["params"], x
    )
    assert y.dtype == dtype
    evaluated = module.apply(variables, x, use_running_average=True)
    results.append((y, updated, grads, evaluated))
  for a, b in zip(
    jax.tree.leaves(results[0][:2] + results[0][3:]),
    jax.tree.leaves(results[1][:2] + results[1][3:]),
  ):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  flat = [[np.asarray(g, np.float32) for g in jax.tree.leaves(r[2])] for r in results]
  _assert_close(flat[0], flat[1], dtype, names=[str(i) for i in range(len(flat[0]))])


def test_depthwise_kernel_gradient_sums_the_batch_in_chunks(monkeypatch):
  """The kernel gradient sums the batch a chunk of images at a time: uneven chunks included."""
  monkeypatch.setattr(cpu_kernels, "KERNEL_GRAD_IMAGES", 2)
  x, w = _normal(0, (5, 6, 5, 8)), _normal(1, (3, 3, 1, 8))
  cotangent = _normal(2, (5, 6, 5, 8))
  ours = _value_and_grads(
    functools.partial(_ours_conv, strides=(1, 1), padding="SAME", groups=8), x, w, cotangent
  )
  native = _value_and_grads(
    functools.partial(_native_conv, strides=(1, 1), padding="SAME", groups=8), x, w, cotangent
  )
  _assert_close(ours, native, jnp.float32)
