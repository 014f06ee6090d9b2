"""Xception (Chollet 2016, figure 5), layer for layer the Keras Applications network, plus the
knobs that move it along the paper's spectrum between regular and depthwise separable convs.

With its defaults the module is Keras's `Xception`: 22,855,952 trainable parameters and 54,528
batch-statistic entries with 1000 classes; TF "SAME" padding (extra pixel at the bottom/right),
batch norm epsilon 1e-3 after every conv, no biases except the classifier, a ReLU *before* each
separable conv in the entry/middle/exit blocks and *after* the batch norm for the last two.

The spectrum knobs (see `Xception`'s attributes) are resolved once, before any tracing, into an
`XceptionArchitecture`: the channel width of each of the eight width slots and the segment count
of every separable layer. Invalid settings (a segment count that does not divide a layer's
channels, an unknown order, ...) raise ValueError when the module is constructed, naming the layer,
its channel count and the valid choices. `costs.py` and `budget.py` read the same architecture, so
the analytic costs and the budget solver describe exactly the network that gets built.

Parameter names mirror the Keras layer names (block2_sepconv1, block2_sepconv1_bn, predictions,
...) so that Keras weights map onto them; Keras's auto-named 1x1 shortcut convs are called
`block{i}_shortcut` / `block{i}_shortcut_bn` here. Exit blocks keep their Keras numbers (13, 14)
with 8 middle blocks and are renumbered consecutively otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp

from xception_jax.models import layers

# The eight distinct channel widths of Xception, in network order. The middle flow's width is also
# the width of block4 (entry) and of block13_sepconv1 (exit), because identity shortcuts need it.
WIDTH_SLOTS = ("stem1", "stem2", "entry1", "entry2", "middle", "exit1", "exit2", "exit3")
REFERENCE_WIDTHS = (32, 64, 128, 256, 728, 1024, 1536, 2048)
FLOWS = ("entry", "middle", "exit")
MIN_IMAGE_SIZE = 71  # Keras's minimum: the smallest input whose exit flow is still >= 3x3.
WIDTH_QUANTUM = 8  # widths from a multiplier or the budget solver are multiples of 8


@dataclasses.dataclass(frozen=True)
class SeparableLayer:
  """One separable layer of the network, in terms of width slots (not yet channel counts)."""
  name: str  # e.g. "block5_sepconv2"
  flow: str  # "entry" | "middle" | "exit"
  in_slot: str
  out_slot: str

  def spatial_slot(self, order: str) -> str:
    """The slot whose channels the grouped spatial conv sees: input or output of the layer."""
    return self.in_slot if order == "depthwise_first" else self.out_slot


def block_names(num_middle_blocks: int) -> dict[str, list[str]]:
  """Block names per flow: entry block2-4, middle block5.., exit the next two (13 and 14 with 8
  middle blocks)."""
  middle = [f"block{5 + i}" for i in range(num_middle_blocks)]
  exit_ = [f"block{5 + num_middle_blocks}", f"block{6 + num_middle_blocks}"]
  return {"entry": ["block2", "block3", "block4"], "middle": middle, "exit": exit_}


def separable_layers(num_middle_blocks: int) -> tuple[SeparableLayer, ...]:
  """Every separable layer of the network with the width slots it maps between, in order."""
  blocks = block_names(num_middle_blocks)
  result = []
  previous = "stem2"
  for block, slot in zip(blocks["entry"], ("entry1", "entry2", "middle")):
    result.append(SeparableLayer(f"{block}_sepconv1", "entry", previous, slot))
    result.append(SeparableLayer(f"{block}_sepconv2", "entry", slot, slot))
    previous = slot
  for block in blocks["middle"]:
    for i in (1, 2, 3):
      result.append(SeparableLayer(f"{block}_sepconv{i}", "middle", "middle", "middle"))
  block13, block14 = blocks["exit"]
  result.append(SeparableLayer(f"{block13}_sepconv1", "exit", "middle", "middle"))
  result.append(SeparableLayer(f"{block13}_sepconv2", "exit", "middle", "exit1"))
  result.append(SeparableLayer(f"{block14}_sepconv1", "exit", "exit1", "exit2"))
  result.append(SeparableLayer(f"{block14}_sepconv2", "exit", "exit2", "exit3"))
  return tuple(result)


# --- Segment settings ------------------------------------------------------------------------

# A per-flow segment rule: ("depthwise", None), ("segments", G) or ("group_width", channels).
SegmentRule = tuple[str, int | None]


def _parse_rule(value: Any, kind: str, where: str) -> SegmentRule:
  if value is None or (isinstance(value, str) and value.lower() == "depthwise"):
    return ("depthwise", None)
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{where}={value!r} is not valid: use a positive int or 'depthwise'")
  return (kind, value)


def segment_rules(segments: Any = None, group_width: Any = None) -> dict[str, SegmentRule]:
  """Normalises `segments` / `group_width` (int, "depthwise" or a per-flow dict) to flow rules.

  Neither given means Xception: depthwise everywhere. Flows missing from a dict stay depthwise.
  """
  if segments is not None and group_width is not None:
    raise ValueError("segments and group_width are two spellings of the same setting; give one "
                     f"(got segments={segments!r}, group_width={group_width!r})")
  kind, value = ("group_width", group_width) if group_width is not None else ("segments", segments)
  if isinstance(value, Mapping):
    unknown = sorted(set(value) - set(FLOWS))
    if unknown:
      raise ValueError(f"{kind} has unknown flow(s) {unknown}; valid flows: {list(FLOWS)}")
    return {f: _parse_rule(value.get(f), kind, f"{kind}[{f!r}]") for f in FLOWS}
  rule = _parse_rule(value, kind, kind)
  return {f: rule for f in FLOWS}


def segments_for(rule: SegmentRule, channels: int) -> int | None:
  """Segment count a rule gives a spatial conv of `channels` channels, or None if it cannot."""
  kind, value = rule
  if kind == "depthwise":
    return channels
  if kind == "segments":
    return value if channels % value == 0 else None
  return channels // value if channels % value == 0 else None


def rule_quantum(rule: SegmentRule) -> int:
  """The channel multiple a rule needs: G for G segments, w for group width w, 1 for depthwise."""
  return 1 if rule[0] == "depthwise" else rule[1]


def _describe_rule(rule: SegmentRule) -> str:
  return "'depthwise'" if rule[0] == "depthwise" else f"{rule[0]}={rule[1]}"


# --- The resolved architecture -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XceptionArchitecture:
  """Everything the network's shape depends on, resolved and validated.

  Attributes:
    widths: channel width per WIDTH_SLOTS entry.
    layer_segments: (separable layer name, segment count of its spatial conv), in network order.
    num_middle_blocks: middle-flow repetitions.
    order: "depthwise_first" | "pointwise_first".
    residual: whether the blocks have shortcuts (1x1 strided convs + BN in entry/exit blocks).
    num_classes: classifier outputs; 0 = headless.
    fc_layers: widths of the fully connected ReLU layers before the classifier.
    budget_target: the parameter count the budget solver aimed at (None without a budget).
  """
  widths: tuple[int, ...]
  layer_segments: tuple[tuple[str, int], ...]
  num_middle_blocks: int
  order: str
  residual: bool
  num_classes: int
  fc_layers: tuple[int, ...]
  budget_target: int | None = None

  def width(self, slot: str) -> int:
    return self.widths[WIDTH_SLOTS.index(slot)]

  def segments(self, layer: str) -> int:
    return dict(self.layer_segments)[layer]

  @property
  def widths_by_slot(self) -> dict[str, int]:
    return dict(zip(WIDTH_SLOTS, self.widths))


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return value


def _multiplied_widths(base: Sequence[int], width_multiplier: float) -> tuple[int, ...]:
  if width_multiplier == 1.0:
    return tuple(base)
  return tuple(max(WIDTH_QUANTUM, round(w * width_multiplier / WIDTH_QUANTUM) * WIDTH_QUANTUM)
               for w in base)


def _layer_segments(widths: Sequence[int], rules: Mapping[str, SegmentRule], order: str,
                    num_middle_blocks: int) -> tuple[tuple[tuple[str, int], ...], list[str]]:
  """Segment count per separable layer, plus one message per (rule, channel count) that fails."""
  by_slot = dict(zip(WIDTH_SLOTS, widths))
  resolved = []
  failures: dict[tuple[SegmentRule, int], list[str]] = {}  # (rule, channels) -> layer names
  for layer in separable_layers(num_middle_blocks):
    channels = by_slot[layer.spatial_slot(order)]
    rule = rules[layer.flow]
    count = segments_for(rule, channels)
    if count is None:
      failures.setdefault((rule, channels), []).append(layer.name)
      count = 0
    resolved.append((layer.name, count))
  errors = []
  for (rule, channels), names in failures.items():
    others = f" (and {len(names) - 1} more layers of {channels})" if len(names) > 1 else ""
    errors.append(f"{_describe_rule(rule)} does not divide the {channels} channels of the spatial "
                  f"conv of layer {names[0]}{others}; valid segment counts for {channels} "
                  f"channels: {', '.join(map(str, layers.divisors(channels)))}")
  return tuple(resolved), errors


def valid_uniform_segments(widths: Sequence[int], order: str = "depthwise_first",
                           num_middle_blocks: int = 8) -> list[int]:
  """Segment counts that divide the spatial conv of every separable layer at these widths."""
  by_slot = dict(zip(WIDTH_SLOTS, widths))
  channels = [by_slot[layer.spatial_slot(order)] for layer in separable_layers(num_middle_blocks)]
  return layers.divisors(math.gcd(*channels))


def _freeze(value: Any) -> Any:
  """Makes a kwarg hashable (dicts -> FrozenDict, lists -> tuples) so modules stay hashable."""
  if isinstance(value, Mapping):
    return FrozenDict({k: _freeze(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


@functools.lru_cache(maxsize=256)
def _resolve_cached(segments, group_width, order, width_multiplier, num_middle_blocks, widths,
                    budget, num_classes, fc_layers, residual) -> XceptionArchitecture:
  if order not in layers.ORDERS:
    raise ValueError(f"Unknown order {order!r}; valid: {list(layers.ORDERS)}")
  rules = segment_rules(segments, group_width)
  num_middle_blocks = _check_int("num_middle_blocks", num_middle_blocks, 0)
  num_classes = 0 if num_classes is None else _check_int("num_classes", num_classes, 0)
  fc_layers = tuple(_check_int(f"fc_layers[{i}]", f, 1) for i, f in enumerate(fc_layers or ()))
  if not isinstance(residual, bool):
    raise ValueError(f"residual must be True or False, got {residual!r}")
  if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) or (
      width_multiplier <= 0):
    raise ValueError(f"width_multiplier must be a positive number, got {width_multiplier!r}")
  if widths is not None:
    if isinstance(widths, Mapping):
      unknown = sorted(set(widths) - set(WIDTH_SLOTS))
      if unknown:
        raise ValueError(f"widths has unknown slot(s) {unknown}; valid: {list(WIDTH_SLOTS)}")
      widths = tuple(widths.get(s, w) for s, w in zip(WIDTH_SLOTS, REFERENCE_WIDTHS))
    if len(widths) != len(WIDTH_SLOTS):
      raise ValueError(f"widths needs {len(WIDTH_SLOTS)} ints for slots {list(WIDTH_SLOTS)}, "
                       f"got {widths!r}")
    widths = tuple(_check_int(f"widths[{s!r}]", w, 1) for s, w in zip(WIDTH_SLOTS, widths))
  base = _multiplied_widths(widths or REFERENCE_WIDTHS, width_multiplier)
  common = dict(num_middle_blocks=num_middle_blocks, order=order, residual=residual,
                num_classes=num_classes, fc_layers=fc_layers)

  if budget is None:
    layer_segments, errors = _layer_segments(base, rules, order, num_middle_blocks)
    if errors:
      uniform = valid_uniform_segments(base, order, num_middle_blocks)
      raise ValueError(
          "Invalid segment setting: " + "; ".join(errors) +
          f". Segment counts valid for every layer at these widths: {uniform} or 'depthwise'; "
          "a per-flow dict {'entry': .., 'middle': .., 'exit': ..} or budget='params' (widths "
          "chosen to fit) are the alternatives.")
    return XceptionArchitecture(base, layer_segments, **common)

  # Budget: choose widths (multiples of 8 and of each layer's segment rule) near the target.
  from xception_jax.models import budget as budget_lib  # pylint: disable=g-import-not-at-top
  from xception_jax.models import costs  # pylint: disable=g-import-not-at-top
  if isinstance(budget, str) and budget == "params":
    reference_segments, _ = _layer_segments(base, segment_rules(), order, num_middle_blocks)
    target = costs.xception_param_counts(
        XceptionArchitecture(base, reference_segments, **common))[0]
  elif isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0 and (
      float(budget).is_integer()):  # configs may spell 20M as 2e7
    target = int(budget)
  else:
    raise ValueError(f"budget must be None, 'params' (Xception's parameter count at these "
                     f"settings) or a positive int parameter count, got {budget!r}")
  quanta = {slot: WIDTH_QUANTUM for slot in WIDTH_SLOTS}
  for layer in separable_layers(num_middle_blocks):
    slot = layer.spatial_slot(order)
    quanta[slot] = math.lcm(quanta[slot], rule_quantum(rules[layer.flow]))

  def architecture_at(candidate: tuple[int, ...]) -> XceptionArchitecture:
    layer_segments, errors = _layer_segments(candidate, rules, order, num_middle_blocks)
    assert not errors, errors  # quanta guarantee divisibility
    return XceptionArchitecture(candidate, layer_segments, **common, budget_target=target)

  solution = budget_lib.solve_widths(
      base_widths=base, quanta=tuple(quanta[s] for s in WIDTH_SLOTS), target=target,
      count_params=lambda w: costs.xception_param_counts(architecture_at(w))[0],
      slot_names=WIDTH_SLOTS)
  return architecture_at(solution.widths)


def resolve_architecture(*, segments: Any = None, group_width: Any = None,
                         order: str = "depthwise_first", width_multiplier: float = 1.0,
                         num_middle_blocks: int = 8, widths: Any = None, budget: Any = None,
                         num_classes: int | None = 1000, fc_layers: Sequence[int] = (),
                         residual: bool = True) -> XceptionArchitecture:
  """Validates the shape-determining settings and resolves widths and per-layer segment counts.

  Raises ValueError naming the offending setting or layer. Results are cached: the module calls
  this at construction and again when traced.
  """
  return _resolve_cached(_freeze(segments), _freeze(group_width), order, width_multiplier,
                         num_middle_blocks, _freeze(widths), budget, num_classes,
                         _freeze(tuple(fc_layers or ())), residual)


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
    width_multiplier: scales every width (rounded to multiples of 8) unless it is 1.0.
    num_middle_blocks: middle-flow repetitions (8 in the paper).
    widths: explicit widths for the 8 slots of WIDTH_SLOTS (tuple, or dict of overrides).
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
      raise ValueError(f"Unknown mid_activation {self.mid_activation!r}; "
                       f"valid: {list(layers.ACTIVATIONS)}")
    if isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, (int, float)) or (
        not 0.0 <= self.dropout_rate < 1.0):
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    layers.canonical_dtype(self.dtype)
    super().__post_init__()

  @nn.nowrap
  def architecture(self) -> XceptionArchitecture:
    """The resolved widths and per-layer segment counts of this configuration."""
    return resolve_architecture(
        segments=self.segments, group_width=self.group_width, order=self.order,
        width_multiplier=self.width_multiplier, num_middle_blocks=self.num_middle_blocks,
        widths=self.widths, budget=self.budget, num_classes=self.num_classes,
        fc_layers=self.fc_layers, residual=self.residual)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Logits [B, num_classes] (float32), or the final feature map when headless.

    Args:
      images: [B, H, W, C] with H, W >= 71, values in [-1, 1] (x / 127.5 - 1).
      train: batch statistics from the batch (and updated) and dropout on, when True.
    """
    if images.ndim != 4:
      raise ValueError(f"Xception expects images of shape [batch, height, width, channels], "
                       f"got shape {images.shape}")
    if min(images.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f"Xception needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} "
                       f"pixels, got {images.shape[1]}x{images.shape[2]} (images shape "
                       f"{images.shape})")
    arch = self.architecture()
    dtype = layers.canonical_dtype(self.dtype)
    width = arch.width
    conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=layers.kernel_init)
    batch_norm = functools.partial(layers.BatchNorm, use_running_average=not train, dtype=dtype)

    def separable_bn(x, features, name):
      x = layers.SeparableConv(features, segments=arch.segments(name), order=self.order,
                               mid_activation=self.mid_activation, dtype=dtype, name=name)(x)
      return batch_norm(name=f"{name}_bn")(x)

    def shortcut(x, features, block):
      # layers.conv_general_dilated: a strided matrix product on CPU, the native conv elsewhere.
      x = conv(features, (1, 1), strides=(2, 2), padding="SAME", name=f"{block}_shortcut",
               conv_general_dilated=layers.conv_general_dilated)(x)
      return batch_norm(name=f"{block}_shortcut_bn")(x)

    def max_pool(x):
      # layers.max_pool: a cheaper backward pass on CPU, nn.max_pool elsewhere.
      return layers.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

    blocks = block_names(arch.num_middle_blocks)
    x = jnp.asarray(images, dtype)

    # Entry flow: the stem (two VALID 3x3 convs) ...
    x = conv(width("stem1"), (3, 3), strides=(2, 2), padding="VALID", name="block1_conv1")(x)
    x = nn.relu(batch_norm(name="block1_conv1_bn")(x))
    x = conv(width("stem2"), (3, 3), padding="VALID", name="block1_conv2")(x)
    x = nn.relu(batch_norm(name="block1_conv2_bn")(x))

    # ... and three downsampling blocks. block2 has no leading ReLU: the stem's ReLU precedes it.
    for i, (block, slot) in enumerate(zip(blocks["entry"], ("entry1", "entry2", "middle"))):
      residual = shortcut(x, width(slot), block) if arch.residual else None
      if i > 0:
        x = nn.relu(x)
      x = separable_bn(x, width(slot), f"{block}_sepconv1")
      x = nn.relu(x)
      x = separable_bn(x, width(slot), f"{block}_sepconv2")
      x = max_pool(x)
      if residual is not None:
        x = x + residual

    # Middle flow: identity shortcuts around three (ReLU, SepConv, BN).
    for block in blocks["middle"]:
      residual = x
      for j in (1, 2, 3):
        x = separable_bn(nn.relu(x), width("middle"), f"{block}_sepconv{j}")
      if arch.residual:
        x = x + residual

    # Exit flow: one more downsampling block, then two SepConvs with the ReLU after the BN.
    block13, block14 = blocks["exit"]
    residual = shortcut(x, width("exit1"), block13) if arch.residual else None
    x = separable_bn(nn.relu(x), width("middle"), f"{block13}_sepconv1")
    x = separable_bn(nn.relu(x), width("exit1"), f"{block13}_sepconv2")
    x = max_pool(x)
    if residual is not None:
      x = x + residual
    x = nn.relu(separable_bn(x, width("exit2"), f"{block14}_sepconv1"))
    x = nn.relu(separable_bn(x, width("exit3"), f"{block14}_sepconv2"))

    if not arch.num_classes:
      return jnp.asarray(x, jnp.float32)

    # Head: global average pooling, optional FC layers, dropout, the logistic regression.
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(dtype)
    for i, features in enumerate(arch.fc_layers):
      x = nn.relu(nn.Dense(features, dtype=dtype, kernel_init=layers.kernel_init,
                           name=f"fc{i + 1}")(x))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(arch.num_classes, dtype=dtype, kernel_init=layers.kernel_init,
                 name="predictions")(x)
    return jnp.asarray(x, jnp.float32)
