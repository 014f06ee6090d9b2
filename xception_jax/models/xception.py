"""Xception (Chollet 2016, figure 5), layer for layer the Keras Applications network, plus the
knobs that move it along the paper's spectrum between regular and depthwise separable convs.

With its defaults the module is Keras's `Xception`: 22,855,952 trainable parameters and 54,528
batch-statistic entries with 1000 classes; TF "SAME" padding (extra pixel at the bottom/right),
batch norm epsilon 1e-3 after every conv, no biases except the classifier, a ReLU *before* each
separable conv in the entry/middle/exit blocks and *after* the batch norm for the last two.

The module builds itself by walking the network's one description (`xception_arch.STEM` and
`blocks`), as the cost model, the budget solver and the Keras importer do. The spectrum knobs (see
`Xception`'s attributes) are resolved once, before any tracing, into an
`xception_arch.XceptionArchitecture`: the channel width of each of the eight width slots and the
segment count of every separable layer. Invalid settings (a segment count that does not divide a
layer's channels, an unknown order, ...) raise ValueError when the module is constructed, naming
the layer, its channel count and the valid choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import functools
from typing import Any

from flax.core import FrozenDict
import flax.linen as nn
import jax
import jax.numpy as jnp

from xception_jax.models import budget as budget_lib
from xception_jax.models import head
from xception_jax.models import layers
from xception_jax.models import xception_arch


def _freeze(value: Any) -> Any:
  """Makes a kwarg hashable (dicts -> FrozenDict, lists -> tuples) so modules stay hashable."""
  if isinstance(value, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


@functools.lru_cache(maxsize=256, typed=True)
def _resolve(
  arch: xception_arch.XceptionArchitecture, budget: Any
) -> xception_arch.XceptionArchitecture:
  return arch.validated() if budget is None else budget_lib.fit_budget(arch, budget)


def resolve_architecture(
  *,
  segments: Any = None,
  group_width: Any = None,
  order: str = "depthwise_first",
  width_multiplier: float = 1.0,
  num_middle_blocks: int = 8,
  widths: Any = None,
  budget: Any = None,
  num_classes: int | None = 1000,
  fc_layers: Sequence[int] = (),
  residual: bool = True,
) -> xception_arch.XceptionArchitecture:
  """Validates the shape-determining settings and resolves widths and per-layer segment counts.

  Raises ValueError naming the offending setting or layer. The settings are checked on every call
  (cheap); the resolution is cached on their normalised form, because the module calls this at
  construction and again when traced, and a budget search walks the network hundreds of times.
  Caching after validation keeps a value that compares equal to a valid one (residual=1 after
  residual=True) from being let through by the cache.
  """
  arch = xception_arch.validate_settings(
    segments=segments,
    group_width=group_width,
    order=order,
    width_multiplier=width_multiplier,
    num_middle_blocks=num_middle_blocks,
    widths=widths,
    num_classes=num_classes,
    fc_layers=fc_layers,
    residual=residual,
  )
  return _resolve(arch, budget)


# --- The module --------------------------------------------------------------------------------


class Xception(nn.Module):
  """Xception with the spectrum knobs; the defaults are the paper's / Keras's network.

  Attributes:
    num_classes: classifier outputs; 0 or None = headless, returning the final feature map
      [B, h, w, width('exit3')] (after the last ReLU, before pooling).
    segments: channel segments of every separable layer's spatial conv: an int (1 = regular conv,
      C = depthwise), "depthwise" (one per channel, the default), or a dict per flow
      {"entry": .., "middle": .., "exit": ..} (missing flows stay depthwise).
    group_width: the alternative spelling, channels per segment (int or per-flow dict); 1 is
      depthwise. Mutually exclusive with `segments`.
    order: "depthwise_first" (Xception / TensorFlow) or "pointwise_first" (paper figure 4).
    mid_activation: "none" (Xception), "relu" or "elu" between the spatial and pointwise steps.
    residual: shortcuts around the entry, middle and exit blocks (paper figure 9 turns them off).
    fc_layers: fully connected ReLU layers before the classifier, e.g. (4096, 4096).
    dropout_rate: dropout before the classifier (0.5 in the paper's ImageNet recipe).
    frozen_batch_norm: batch norm normalises with its moving statistics and leaves them as they
      are, also when train=True (its scale and offset still train): fine-tuning pretrained
      weights on small batches, as Keras's transfer-learning guide does. Dropout is unaffected.
    width_multiplier: scales every width (rounded to multiples of 8) unless it is 1.0.
    num_middle_blocks: middle-flow repetitions (8 in the paper).
    widths: explicit widths for the 8 slots of xception_arch.WIDTH_SLOTS (tuple, or dict of
      overrides).
    budget: None, "params" (pick widths so the parameter count is within +-1% of this
      configuration's depthwise Xception), or an int target parameter count.
    dtype: compute dtype ("float32" | "bfloat16" or a jnp dtype). Parameters and batch
      statistics stay float32, logits (or the headless feature map) are returned as float32.
  """

  num_classes: int | None = 1000
  segments: Any = None
  group_width: Any = None
  order: str = "depthwise_first"
  mid_activation: str = "none"
  residual: bool = True
  fc_layers: Sequence[int] = ()
  dropout_rate: float = 0.0
  frozen_batch_norm: bool = False
  width_multiplier: float = 1.0
  num_middle_blocks: int = 8
  widths: Any = None
  budget: Any = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Dict / list kwargs (from configs) become hashable so the module can be a jit static arg.
    for field in ("segments", "group_width", "widths", "fc_layers"):
      object.__setattr__(self, field, _freeze(getattr(self, field)))
    if isinstance(self.fc_layers, int):
      object.__setattr__(self, "fc_layers", (self.fc_layers,))
    # Validate everything before any tracing: construction fails, not compilation.
    self.architecture()
    if self.mid_activation not in layers.ACTIVATIONS:
      raise ValueError(
        f"Unknown mid_activation {self.mid_activation!r}; valid: {list(layers.ACTIVATIONS)}"
      )
    if (
      isinstance(self.dropout_rate, bool)
      or not isinstance(self.dropout_rate, (int, float))
      or (not 0.0 <= self.dropout_rate < 1.0)
    ):
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    layers.canonical_dtype(self.dtype)
    super().__post_init__()

  @nn.nowrap
  def architecture(self) -> xception_arch.XceptionArchitecture:
    """The resolved widths and per-layer segment counts of this configuration."""
    return resolve_architecture(
      segments=self.segments,
      group_width=self.group_width,
      order=self.order,
      width_multiplier=self.width_multiplier,
      num_middle_blocks=self.num_middle_blocks,
      widths=self.widths,
      budget=self.budget,
      num_classes=self.num_classes,
      fc_layers=self.fc_layers,
      residual=self.residual,
    )

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32), or the final feature map when headless.

    Args:
      images: [B, H, W, C] with H, W >= 71, values in [-1, 1] (x / 127.5 - 1).
      train: batch statistics from the batch (and updated) and dropout on, when True.
    """
    if images.ndim != 4:
      raise ValueError(
        f"Xception expects images of shape [batch, height, width, channels], "
        f"got shape {images.shape}"
      )
    size = xception_arch.MIN_IMAGE_SIZE
    if min(images.shape[1:3]) < size:
      raise ValueError(
        f"Xception needs images of at least {size}x{size} pixels, got "
        f"{images.shape[1]}x{images.shape[2]} (images shape {images.shape})"
      )
    arch = self.architecture()
    dtype = layers.canonical_dtype(self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=layers.kernel_init)
    batch_norm = functools.partial(
      layers.BatchNorm, dtype=dtype, use_running_average=not train or self.frozen_batch_norm
    )

    x = jnp.asarray(images, dtype)
    for stem in xception_arch.STEM:
      x = conv(
        arch.width(stem.out_slot),
        (3, 3),
        strides=(stem.stride, stem.stride),
        padding="VALID",
        name=stem.name,
        # On CPU, XLA's kernel gradient of these convs is replaced by matrix products.
        conv_general_dilated=layers.conv_general_dilated,
      )(x)
      x = nn.relu(batch_norm(name=xception_arch.bn_name(stem.name))(x))

    for block in xception_arch.blocks(arch.num_middle_blocks):
      shortcut = arch.shortcut(block)
      residual = x if shortcut == "identity" else None
      if shortcut == "conv":
        # layers.conv_general_dilated: a strided matrix product on CPU, the native conv elsewhere.
        residual = conv(
          arch.width(block.out_slot),
          (1, 1),
          strides=(2, 2),
          padding="SAME",
          name=block.shortcut_name,
          conv_general_dilated=layers.conv_general_dilated,
        )(x)
        residual = batch_norm(name=xception_arch.bn_name(block.shortcut_name))(residual)
      for i, layer in enumerate(block.layers):
        if block.relu_before(i):
          x = nn.relu(x)
        x = layers.SeparableConv(
          arch.width(layer.out_slot),
          segments=arch.segments(layer.name),
          order=self.order,
          mid_activation=self.mid_activation,
          dtype=dtype,
          name=layer.name,
        )(x)
        x = batch_norm(name=xception_arch.bn_name(layer.name))(x)
        if block.relu_after_bn:
          x = nn.relu(x)
      if block.pool:
        # layers.max_pool: a cheaper backward pass on CPU, nn.max_pool elsewhere.
        x = layers.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      if residual is not None:
        x = x + residual

    return head.classifier_head(
      x,
      num_classes=arch.num_classes,
      fc_layers=arch.fc_layers,
      dropout_rate=self.dropout_rate,
      train=train,
      dtype=dtype,
    )
