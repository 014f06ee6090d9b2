"""Xception described once, as data, and the settings that size it resolved into an architecture.

The network (Chollet 2016, figure 5; Keras Applications' `Xception`) is a stem of two regular
convs (`STEM`) followed by residual blocks of separable layers (`blocks()`): three entry blocks,
`num_middle_blocks` middle blocks and two exit blocks. Everything that follows the network layer by
layer walks this one description: the Flax module (`xception.Xception`), the analytic costs
(`xception_costs`), the budget solver (`budget`) and the Keras weight importer
(`xception_jax.convert`). A change to the network is a change here.

Layers are described in terms of width slots (`WIDTH_SLOTS`), not channel counts. The settings,
checked by `validate_settings`, give an `XceptionArchitecture`: a width per slot and a segment rule
per flow, from which it resolves the segment count of every separable layer, or raises ValueError
naming the layer, its channel count and the valid choices.

Names mirror the Keras layer names (block2_sepconv1, block2_sepconv1_bn, ...) so that Keras
weights map onto them; Keras's auto-named 1x1 shortcut convs are called `block{i}_shortcut` /
`block{i}_shortcut_bn` here. Exit blocks keep their Keras numbers (13, 14) with 8 middle blocks
and are renumbered consecutively otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

from xception_jax.models import layers

# The eight distinct channel widths of Xception, in network order. The middle flow's width is also
# the width of block4 (entry) and of block13_sepconv1 (exit), because identity shortcuts need it.
WIDTH_SLOTS = ("stem1", "stem2", "entry1", "entry2", "middle", "exit1", "exit2", "exit3")
REFERENCE_WIDTHS = (32, 64, 128, 256, 728, 1024, 1536, 2048)
FLOWS = ("entry", "middle", "exit")
MIN_IMAGE_SIZE = 71  # Keras's minimum: the smallest input whose exit flow is still >= 3x3.
WIDTH_QUANTUM = 8  # widths from a multiplier or the budget solver are multiples of 8

# --- The description ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StemConv:
  """A regular 3x3 VALID conv of the stem, followed by batch norm and ReLU."""
  name: str  # e.g. "block1_conv1"
  out_slot: str
  stride: int


STEM = (StemConv("block1_conv1", "stem1", stride=2), StemConv("block1_conv2", "stem2", stride=1))


@dataclasses.dataclass(frozen=True)
class SeparableLayer:
  """One separable layer (followed by batch norm), in terms of width slots."""
  name: str  # e.g. "block5_sepconv2"
  flow: str  # "entry" | "middle" | "exit"
  in_slot: str
  out_slot: str

  def spatial_slot(self, order: str) -> str:
    """The slot whose channels the grouped spatial conv sees: input or output of the layer."""
    return self.in_slot if order == "depthwise_first" else self.out_slot


@dataclasses.dataclass(frozen=True)
class Block:
  """A block of separable layers, each followed by batch norm, with a shortcut around them.

  Attributes:
    name: "block2", ...; the prefix of its layers' names.
    flow: "entry" | "middle" | "exit".
    layers: the separable layers, in order.
    shortcut: "conv" (a 1x1 stride-2 conv + batch norm to the block's output width, added after
      the max pool), "identity", or None. Residual=False networks drop every shortcut.
    pool: a 3x3 stride-2 SAME max pool after the last layer.
    leading_relu: a ReLU before the first layer (block2's input already went through the stem's).
    relu_after_bn: the ReLU comes after each layer's batch norm instead of before each layer
      (the last exit block).
  """
  name: str
  flow: str
  layers: tuple[SeparableLayer, ...]
  shortcut: str | None = None
  pool: bool = False
  leading_relu: bool = True
  relu_after_bn: bool = False

  @property
  def out_slot(self) -> str:
    return self.layers[-1].out_slot

  @property
  def shortcut_name(self) -> str:
    return f"{self.name}_shortcut"

  def relu_before(self, index: int) -> bool:
    """Whether a ReLU precedes the index-th (from 0) separable layer."""
    return not self.relu_after_bn and (index > 0 or self.leading_relu)


def bn_name(layer: str) -> str:
  """The batch norm after a conv or separable layer: Keras's name for it."""
  return f"{layer}_bn"


def _block(number: int, flow: str, slots: Sequence[str], **kwargs: Any) -> Block:
  """Block `number` whose separable layers map slots[0] -> slots[1] -> ... -> slots[-1]."""
  name = f"block{number}"
  chain = tuple(SeparableLayer(f"{name}_sepconv{i}", flow, a, b)
                for i, (a, b) in enumerate(zip(slots, slots[1:]), start=1))
  return Block(name, flow, chain, **kwargs)


@functools.lru_cache(maxsize=32)
def blocks(num_middle_blocks: int) -> tuple[Block, ...]:
  """The blocks after the stem, in network order: entry block2-4, middle block5.., exit the next
  two (13 and 14 with 8 middle blocks)."""
  n = num_middle_blocks
  return (
      _block(2, "entry", ("stem2", "entry1", "entry1"), shortcut="conv", pool=True,
             leading_relu=False),
      _block(3, "entry", ("entry1", "entry2", "entry2"), shortcut="conv", pool=True),
      _block(4, "entry", ("entry2", "middle", "middle"), shortcut="conv", pool=True),
      *(_block(5 + i, "middle", ("middle",) * 4, shortcut="identity") for i in range(n)),
      _block(5 + n, "exit", ("middle", "middle", "exit1"), shortcut="conv", pool=True),
      _block(6 + n, "exit", ("exit1", "exit2", "exit3"), relu_after_bn=True),
  )


def separable_layers(num_middle_blocks: int) -> tuple[SeparableLayer, ...]:
  """Every separable layer of the network with the width slots it maps between, in order."""
  return tuple(layer for block in blocks(num_middle_blocks) for layer in block.layers)


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
  The one parser of segment settings in the models: an int, a digit string ("4", as command-line
  overrides arrive), "depthwise", or a dict of those per flow.
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


def valid_uniform_segments(widths: Sequence[int], order: str = "depthwise_first",
                           num_middle_blocks: int = 8) -> list[int]:
  """Segment counts that divide the spatial conv of every separable layer at these widths."""
  by_slot = dict(zip(WIDTH_SLOTS, widths))
  channels = [by_slot[layer.spatial_slot(order)] for layer in separable_layers(num_middle_blocks)]
  return layers.divisors(math.gcd(*channels))


# --- The resolved architecture -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XceptionArchitecture:
  """Everything the network's shape depends on.

  Attributes:
    widths: channel width per WIDTH_SLOTS entry.
    rules: (flow, segment rule) per flow, from `segment_rules`; a tuple, so that an architecture
      can key a cache.
    num_middle_blocks: middle-flow repetitions.
    order: "depthwise_first" | "pointwise_first".
    residual: whether the blocks have shortcuts (1x1 strided convs + BN in entry/exit blocks).
    num_classes: classifier outputs; 0 = headless.
    fc_layers: widths of the fully connected ReLU layers before the classifier.
    budget_target: the parameter count the budget solver aimed at (None without a budget).

  The segment count of each layer follows from the rules at these widths (`layer_segments`), which
  raises ValueError where a rule does not divide a layer's channels: an architecture is valid once
  `validated()` has returned it, and the module only ever gets validated ones.
  """
  widths: tuple[int, ...]
  rules: tuple[tuple[str, SegmentRule], ...]
  num_middle_blocks: int
  order: str
  residual: bool
  num_classes: int
  fc_layers: tuple[int, ...]
  budget_target: int | None = None

  def width(self, slot: str) -> int:
    return self.widths[WIDTH_SLOTS.index(slot)]

  def rule(self, flow: str) -> SegmentRule:
    return dict(self.rules)[flow]

  @functools.cached_property
  def layer_segments(self) -> tuple[tuple[str, int], ...]:
    """(separable layer name, segment count of its spatial conv), in network order.

    Raises:
      ValueError: a segment rule does not divide a layer's spatial channels (naming the layer, its
        channels, the counts valid for it and those valid for every layer).
    """
    by_slot = self.widths_by_slot
    resolved = []
    failures: dict[tuple[SegmentRule, int], list[str]] = {}  # (rule, channels) -> layer names
    for layer in separable_layers(self.num_middle_blocks):
      channels = by_slot[layer.spatial_slot(self.order)]
      rule = self.rule(layer.flow)
      count = segments_for(rule, channels)
      if count is None:
        failures.setdefault((rule, channels), []).append(layer.name)
      resolved.append((layer.name, count))
    if failures:
      errors = []
      for (rule, channels), names in failures.items():
        others = f" (and {len(names) - 1} more layers of {channels})" if len(names) > 1 else ""
        errors.append(f"{_describe_rule(rule)} does not divide the {channels} channels of the "
                      f"spatial conv of layer {names[0]}{others}; valid segment counts for "
                      f"{channels} channels: {', '.join(map(str, layers.divisors(channels)))}")
      uniform = valid_uniform_segments(self.widths, self.order, self.num_middle_blocks)
      raise ValueError(
          "Invalid segment setting: " + "; ".join(errors) +
          f". Segment counts valid for every layer at these widths: {uniform} or 'depthwise'; "
          "a per-flow dict {'entry': .., 'middle': .., 'exit': ..} or budget='params' (widths "
          "chosen to fit) are the alternatives.")
    return tuple(resolved)

  def validated(self) -> XceptionArchitecture:
    """This architecture, once its segment rules are known to divide every layer (see above)."""
    _ = self.layer_segments
    return self

  def segments(self, layer: str) -> int:
    return dict(self.layer_segments)[layer]

  def shortcut(self, block: Block) -> str | None:
    """The block's shortcut in this network: None everywhere when residual is off."""
    return block.shortcut if self.residual else None

  @property
  def widths_by_slot(self) -> dict[str, int]:
    return dict(zip(WIDTH_SLOTS, self.widths))


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return value


def _base_widths(widths: Any, width_multiplier: Any) -> tuple[int, ...]:
  """The widths per slot from `widths` (tuple or dict of overrides) and `width_multiplier`."""
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
  base = widths or REFERENCE_WIDTHS
  if width_multiplier == 1.0:
    return tuple(base)
  return tuple(max(WIDTH_QUANTUM, round(w * width_multiplier / WIDTH_QUANTUM) * WIDTH_QUANTUM)
               for w in base)


def validate_settings(*, segments: Any = None, group_width: Any = None,
                      order: str = "depthwise_first", width_multiplier: float = 1.0,
                      num_middle_blocks: int = 8, widths: Any = None,
                      num_classes: int | None = 1000, fc_layers: Sequence[int] = (),
                      residual: bool = True) -> XceptionArchitecture:
  """Checks the shape-determining settings (all but the budget), naming the one at fault.

  Returns the architecture at the settings' widths. Whether its segment rules divide every layer
  depends on the final widths (a budget re-chooses them): `XceptionArchitecture.validated` checks.
  """
  if order not in layers.ORDERS:
    raise ValueError(f"Unknown order {order!r}; valid: {list(layers.ORDERS)}")
  rules = tuple(segment_rules(segments, group_width).items())
  num_middle_blocks = _check_int("num_middle_blocks", num_middle_blocks, 0)
  num_classes = 0 if num_classes is None else _check_int("num_classes", num_classes, 0)
  fc_layers = tuple(_check_int(f"fc_layers[{i}]", f, 1) for i, f in enumerate(fc_layers or ()))
  if not isinstance(residual, bool):
    raise ValueError(f"residual must be True or False, got {residual!r}")
  return XceptionArchitecture(_base_widths(widths, width_multiplier), rules,
                              num_middle_blocks=num_middle_blocks, order=order,
                              residual=residual, num_classes=num_classes, fc_layers=fc_layers)
