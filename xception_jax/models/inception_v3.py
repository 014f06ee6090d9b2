"""Inception V3 without the auxiliary tower: the baseline the Xception paper compares against.

Layer for layer the same network as Keras Applications' `InceptionV3` (keras/src/applications/
inception_v3.py), so that Keras weight files import by layer order (`xception_jax.convert`) and
the two give the same outputs. Every convolution is `conv2d_bn`: Conv (no bias, SAME unless stated)
-> BatchNorm(scale=False, epsilon=1e-3, momentum=0.99) -> ReLU. The pool branches of mixed0-2, 4-7
and 9-10 average over a 3x3 SAME window and divide by the number of real (non-padding) pixels, as
TF's avg_pool does; the Flax/PyTorch default of counting the padding differs at the borders.

Parameter count. With 1000 classes this module has exactly 23,817,352 trainable parameters and
34,432 batch-statistic entries (94 BatchNorms x (mean, var)), as Keras's model has. The Xception
paper's table 3 gives 23,626,728 for Inception V3, 190,624 fewer: that figure matches no public
implementation (Keras today, the 2016 Keras version, TF-Slim and timm were all tried; see the
project's reference facts), so we match Keras, whose weights are what people fine-tune from.

The network is described once, as data (`STEM`, `BLOCKS`), and `InceptionV3` builds itself from that
description. The weight importer walks the same description to rebuild the Keras layer graph and
recover the order in which Keras stores layers in its .h5 files (see `xception_jax.convert`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xception_jax.models import head
from xception_jax.models import layers
from xception_jax.models import widths

# Smallest input side: the stem and the two stride-2 reductions need 75 pixels (Keras's min_size).
MIN_IMAGE_SIZE = 75


@dataclasses.dataclass(frozen=True)
class Conv:
  """One `conv2d_bn` layer: a bias-free conv, BatchNorm without scale, ReLU."""

  filters: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class Pool:
  """A 3x3 pooling layer: 'avg' is stride 1 SAME excluding padding; 'max' is stride 2 VALID."""

  kind: str  # "avg" | "max"


@dataclasses.dataclass(frozen=True)
class Fork:
  """Two convs applied to the same input, outputs concatenated (the 1x3 / 3x1 pair of mixed9-10)."""

  left: Conv
  right: Conv


Op = Conv | Pool | Fork
Branch = tuple[Op, ...]

AVG = Pool("avg")
MAX = Pool("max")


def _c(filters: int, kh: int, kw: int, stride: int = 1, padding: str = "SAME") -> Conv:
  return Conv(filters, (kh, kw), stride, padding)


# The stem is one chain: 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35.
STEM: Branch = (
  _c(32, 3, 3, 2, "VALID"),
  _c(32, 3, 3, padding="VALID"),
  _c(64, 3, 3),
  MAX,
  _c(80, 1, 1, padding="VALID"),
  _c(192, 3, 3, padding="VALID"),
  MAX,
)


def _block_35(pool_filters: int) -> tuple[Branch, ...]:
  """mixed0-2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
  return (
    (_c(64, 1, 1),),
    (_c(48, 1, 1), _c(64, 5, 5)),
    (_c(64, 1, 1), _c(96, 3, 3), _c(96, 3, 3)),
    (AVG, _c(pool_filters, 1, 1)),
  )


def _block_17(c7: int) -> tuple[Branch, ...]:
  """mixed4-7 (17x17): 7x7 convs factorised into 1x7 and 7x1, `c7` channels inside."""
  return (
    (_c(192, 1, 1),),
    (_c(c7, 1, 1), _c(c7, 1, 7), _c(192, 7, 1)),
    (_c(c7, 1, 1), _c(c7, 7, 1), _c(c7, 1, 7), _c(c7, 7, 1), _c(192, 1, 7)),
    (AVG, _c(192, 1, 1)),
  )


def _block_8() -> tuple[Branch, ...]:
  """mixed9-10 (8x8): the 3x3 branches end in a parallel 1x3 / 3x1 pair (expanded filter bank)."""
  pair = Fork(_c(384, 1, 3), _c(384, 3, 1))
  return (
    (_c(320, 1, 1),),
    (_c(384, 1, 1), pair),
    (_c(448, 1, 1), _c(384, 3, 3), pair),
    (AVG, _c(192, 1, 1)),
  )


# (name, branches): each block concatenates its branches' outputs along channels, in this order.
BLOCKS: tuple[tuple[str, tuple[Branch, ...]], ...] = (
  ("mixed0", _block_35(32)),
  ("mixed1", _block_35(64)),
  ("mixed2", _block_35(64)),
  (
    "mixed3",
    (  # 35 -> 17 grid reduction
      (_c(384, 3, 3, 2, "VALID"),),
      (_c(64, 1, 1), _c(96, 3, 3), _c(96, 3, 3, 2, "VALID")),
      (MAX,),
    ),
  ),
  ("mixed4", _block_17(128)),
  ("mixed5", _block_17(160)),
  ("mixed6", _block_17(160)),
  ("mixed7", _block_17(192)),
  (
    "mixed8",
    (  # 17 -> 8 grid reduction
      (_c(192, 1, 1), _c(320, 3, 3, 2, "VALID")),
      (_c(192, 1, 1), _c(192, 1, 7), _c(192, 7, 1), _c(192, 3, 3, 2, "VALID")),
      (MAX,),
    ),
  ),
  ("mixed9", _block_8()),
  ("mixed10", _block_8()),
)

STEM_NAME = "stem"


def conv_name(branch: int, position: int, side: str = "") -> str:
  """Name of a conv2d_bn inside a block (or the stem, branch 0): shared with the weight importer.

  `position` counts ops along the branch (pools included); `side` is "a"/"b" for the two halves
  of a Fork.
  """
  return f"branch{branch}_{position}{side}"


class ConvBN(nn.Module):
  """Keras's `conv2d_bn`: Conv (no bias) -> BatchNorm (no scale, eps 1e-3) -> ReLU.

  The conv goes through `layers.conv_general_dilated` (and the stride-2 max pools through
  `layers.max_pool`), so that CPU training gets the same rewrites as Xception's layers
  (`layers.CONV_FORMULATIONS`); GPUs and TPUs run the native ops.
  """

  spec: Conv
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
      widths.scaled_width(self.spec.filters, self.width_multiplier),
      self.spec.kernel,
      strides=self.spec.stride,
      padding=self.spec.padding,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=layers.kernel_init,
      conv_general_dilated=layers.conv_general_dilated,
      name="conv",
    )(x)
    x = layers.BatchNorm(
      use_running_average=not train, use_scale=False, dtype=self.dtype, name="bn"
    )(x)
    return nn.relu(x)


def pool(x: jax.Array, kind: str) -> jax.Array:
  """The 3x3 pooling of `Pool(kind)`: avg is stride 1 SAME over real pixels only, max s2 VALID."""
  if kind == "avg":
    # TF semantics: padded positions are not counted in the average.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
  return layers.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionBlock(nn.Module):
  """Parallel branches over one input, concatenated along channels (an Inception module)."""

  branches: tuple[Branch, ...]
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    outputs = [_run_branch(self, x, branch, b, train) for b, branch in enumerate(self.branches)]
    return jnp.concatenate(outputs, axis=-1)


def _run_branch(
  parent: nn.Module, x: jax.Array, branch: Branch, index: int, train: bool
) -> jax.Array:
  """Applies a chain of ops, creating the ConvBN submodules inside `parent`'s compact scope."""
  conv = functools.partial(
    ConvBN, width_multiplier=parent.width_multiplier, dtype=parent.dtype, parent=parent
  )
  for position, op in enumerate(branch):
    if isinstance(op, Pool):
      x = pool(x, op.kind)
    elif isinstance(op, Fork):
      x = jnp.concatenate(
        [
          conv(op.left, name=conv_name(index, position, "a"))(x, train),
          conv(op.right, name=conv_name(index, position, "b"))(x, train),
        ],
        axis=-1,
      )
    else:
      x = conv(op, name=conv_name(index, position))(x, train)
  return x


class Stem(nn.Module):
  """The plain conv/pool chain before mixed0."""

  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return _run_branch(self, x, STEM, 0, train)


class InceptionV3(nn.Module):
  """Inception V3 (Szegedy et al. 2015) as in Keras Applications, without the auxiliary head.

  Attributes:
    num_classes: classifier outputs; 0 or None gives the headless network, which returns the
      mixed10 feature map [B, h, w, 2048] (2048 at width 1.0) for any input of at least 75x75.
    dropout_rate: dropout before the logistic regression (the Xception paper uses 0.5 on ImageNet).
    frozen_batch_norm: batch norm keeps and uses its moving statistics also when train=True
      (fine-tuning on small batches; see Xception's attribute). Dropout is unaffected.
    fc_layers: widths of Dense+ReLU layers between global pooling and the classifier (the paper's
      JFT runs use (4096, 4096)); empty for the reference network.
    width_multiplier: scales every conv's channels (multiples of 8); 1.0 is the reference.
    dtype: compute dtype (e.g. bfloat16); parameters stay float32 and logits are returned float32.
  """

  num_classes: int | None = 1000
  dropout_rate: float = 0.0
  frozen_batch_norm: bool = False
  fc_layers: Sequence[int] = ()
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    if isinstance(self.fc_layers, list):  # from a config: keep the module hashable
      object.__setattr__(self, "fc_layers", tuple(self.fc_layers))
    if self.num_classes is not None and (
      not isinstance(self.num_classes, int) or self.num_classes < 0
    ):
      raise ValueError(
        f"InceptionV3: num_classes must be a positive int, or 0/None for the "
        f"headless network; got {self.num_classes!r}."
      )
    if (
      isinstance(self.dropout_rate, bool)
      or not isinstance(self.dropout_rate, (int, float))
      or not 0.0 <= self.dropout_rate < 1.0
    ):
      raise ValueError(f"InceptionV3: dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")
    if (
      isinstance(self.width_multiplier, bool)
      or not isinstance(self.width_multiplier, (int, float))
      or not self.width_multiplier > 0
    ):
      raise ValueError(f"InceptionV3: width_multiplier must be > 0; got {self.width_multiplier!r}.")
    if any(isinstance(u, bool) or not isinstance(u, int) or u <= 0 for u in self.fc_layers):
      raise ValueError(f"InceptionV3: fc_layers must be positive ints; got {self.fc_layers!r}.")
    if self.fc_layers and not self.num_classes:
      raise ValueError(
        "InceptionV3: fc_layers sit before the classifier, so they need "
        f"num_classes > 0; got num_classes={self.num_classes!r}."
      )
    layers.canonical_dtype(self.dtype)  # raises naming the valid dtypes
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(
        f"InceptionV3: images must be [batch, height, width, channels]; got shape {images.shape}."
      )
    height, width = images.shape[1:3]
    if height < MIN_IMAGE_SIZE or width < MIN_IMAGE_SIZE:
      raise ValueError(
        f"InceptionV3: input {height}x{width} is too small; height and width must "
        f"be at least {MIN_IMAGE_SIZE} (299 is the reference size)."
      )
    dtype = layers.canonical_dtype(self.dtype)
    x = jnp.asarray(images, dtype)
    train_batch_norm = train and not self.frozen_batch_norm  # the body's only use of `train`
    x = Stem(self.width_multiplier, dtype, name=STEM_NAME)(x, train_batch_norm)
    for name, branches in BLOCKS:
      x = InceptionBlock(branches, self.width_multiplier, dtype, name=name)(x, train_batch_norm)
    return head.classifier_head(
      x,
      num_classes=self.num_classes,
      fc_layers=self.fc_layers,
      dropout_rate=self.dropout_rate,
      train=train,
      dtype=dtype,
    )


# A narrow variant for tests and CPU smoke runs: same depth and layer graph, 1/8 of the channels
# (~0.35 M parameters). Its compile times on CPU, and why tests use `jax.eval_shape(model.init)`
# rather than a compiled `init`: BENCHMARKS.md, section 3b.
inception_v3_tiny = functools.partial(InceptionV3, width_multiplier=0.125)
