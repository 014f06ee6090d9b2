"""The budget solver: widths that give a segment setting the same parameter count as Xception.

Points on the spectrum are only comparable at equal capacity: a full 3x3 conv (1 segment) on 728
channels has ten times the weights of a depthwise one, so `segments=1` at Xception's widths is a
much bigger model. The solver scales all widths by one factor (keeping the network's proportions),
rounds each to its allowed multiple (8, and the segment count or group width of every layer whose
spatial conv sees that width), and bisects the factor until the parameter count is within the
tolerance of the target. Rounding makes the count a step function of the factor; when the nearest
steps straddle the tolerance band, single widths (or pairs, one up and one down) are nudged by one
multiple, greedily, until the count fits. The result reports the widths and the achieved ratio.

`solve_widths` is generic over the network: it sees only base widths, their quanta and a
parameter-count function. `fit_budget` applies it to an `XceptionArchitecture`, counting
parameters with the analytic `xception_costs.xception_param_counts` (microseconds per call).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

from xception_jax.models import xception_arch
from xception_jax.models import xception_costs

DEFAULT_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class BudgetSolution:
  """Widths found by `solve_widths` and how close they come to the target."""
  widths: tuple[int, ...]
  params: int
  target: int
  quanta: tuple[int, ...]

  @property
  def ratio(self) -> float:
    """Achieved parameters / target parameters."""
    return self.params / self.target


def _scaled(base: Sequence[int], quanta: Sequence[int], scale: float) -> tuple[int, ...]:
  return tuple(max(q, round(b * scale / q) * q) for b, q in zip(base, quanta))


def solve_widths(*, base_widths: Sequence[int], quanta: Sequence[int], target: int,
                 count_params: Callable[[tuple[int, ...]], int],
                 tolerance: float = DEFAULT_TOLERANCE,
                 slot_names: Sequence[str] | None = None) -> BudgetSolution:
  """Widths (each a multiple of its quantum) whose parameter count is within tolerance of target.

  Args:
    base_widths: the widths whose proportions to keep (e.g. Xception's).
    quanta: the multiple each width must be.
    target: the parameter count to reach.
    count_params: parameter count of the network at given widths (monotone in each width).
    tolerance: allowed relative deviation |params / target - 1|.
    slot_names: names of the widths, for error messages.

  Raises:
    ValueError: when no widths on the allowed grid come within the tolerance (naming the best).
  """
  if len(base_widths) != len(quanta):
    raise ValueError(f"base_widths {tuple(base_widths)} and quanta {tuple(quanta)} differ in "
                     "length")
  if target < 1:
    raise ValueError(f"budget target must be a positive parameter count, got {target}")
  names = list(slot_names) if slot_names else [str(i) for i in range(len(base_widths))]
  cache: dict[tuple[int, ...], int] = {}

  def params(widths: tuple[int, ...]) -> int:
    if widths not in cache:
      cache[widths] = count_params(widths)
    return cache[widths]

  def error(widths: tuple[int, ...]) -> float:
    return abs(params(widths) / target - 1.0)

  # Bracket the target by the scale factor, then bisect to the step where the count crosses it.
  low, high = 1.0, 1.0
  while params(_scaled(base_widths, quanta, high)) < target and high < 1e4:
    high *= 2.0
  while params(_scaled(base_widths, quanta, low)) > target and low > 1e-4:
    low /= 2.0
  for _ in range(60):
    middle = 0.5 * (low + high)
    if params(_scaled(base_widths, quanta, middle)) < target:
      low = middle
    else:
      high = middle
  best = min((_scaled(base_widths, quanta, low), _scaled(base_widths, quanta, high)), key=error)

  # Rounding can leave both neighbouring steps outside the band (coarse quanta). Then nudge single
  # widths by one quantum, each time choosing, among the nudges that bring the count closer, the
  # one that keeps the widths closest (in log scale) to the unrounded proportional widths, so the
  # network's proportions are disturbed as little as possible.
  ideal = [b * 0.5 * (low + high) for b in base_widths]

  def distortion(widths: tuple[int, ...]) -> float:
    return sum(math.log(w / t) ** 2 for w, t in zip(widths, ideal))

  def nudges(widths: tuple[int, ...]):
    """Widths one quantum up or down in one slot, or up in one slot and down in another."""
    n = len(widths)
    moves = [{i: s} for i in range(n) for s in (-1, 1)]
    moves += [{i: 1, j: -1} for i in range(n) for j in range(n) if i != j]
    for move in moves:
      candidate = tuple(w + move.get(i, 0) * q for i, (w, q) in enumerate(zip(widths, quanta)))
      if all(w >= q for w, q in zip(candidate, quanta)):
        yield candidate

  while error(best) > tolerance:
    closer = [(distortion(c), error(c), c) for c in nudges(best) if error(c) < error(best)]
    if not closer:
      break
    best = min(closer)[2]

  if error(best) > tolerance:
    raise ValueError(
        f"The budget solver found no widths within {tolerance:.1%} of {target:,} parameters: "
        f"the closest, {dict(zip(names, best))}, give {params(best):,} "
        f"({params(best) / target:.4f} x). The widths must be multiples of "
        f"{dict(zip(names, quanta))}; a smaller segment count or group width allows a finer grid.")
  return BudgetSolution(widths=best, params=params(best), target=target, quanta=tuple(quanta))


def _target(arch: xception_arch.XceptionArchitecture, budget: Any) -> int:
  """The parameter count a budget setting asks for."""
  if isinstance(budget, str) and budget == "params":
    depthwise = dataclasses.replace(arch, rules=tuple(xception_arch.segment_rules().items()))
    return xception_costs.xception_param_counts(depthwise)[0]
  if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0 and (
      float(budget).is_integer()):  # configs may spell 20M as 2e7
    return int(budget)
  raise ValueError(f"budget must be None, 'params' (Xception's parameter count at these "
                   f"settings) or a positive int parameter count, got {budget!r}")


def fit_budget(arch: xception_arch.XceptionArchitecture,
               budget: Any) -> xception_arch.XceptionArchitecture:
  """`arch` at the widths (multiples of 8 and of each layer's segment rule) nearest the budget.

  Args:
    arch: the architecture from the validated settings; its widths give the proportions to keep.
    budget: "params" (the parameter count of depthwise Xception at these settings) or a positive
      int parameter count.

  Raises:
    ValueError: an invalid budget, or no widths on the allowed grid within the tolerance.
  """
  target = _target(arch, budget)
  quanta = {slot: xception_arch.WIDTH_QUANTUM for slot in xception_arch.WIDTH_SLOTS}
  for layer in xception_arch.separable_layers(arch.num_middle_blocks):
    slot = layer.spatial_slot(arch.order)
    quanta[slot] = math.lcm(quanta[slot], xception_arch.rule_quantum(arch.rule(layer.flow)))

  def at(widths: tuple[int, ...]) -> xception_arch.XceptionArchitecture:
    return dataclasses.replace(arch, widths=widths, budget_target=target)

  solution = solve_widths(
      base_widths=arch.widths, quanta=tuple(quanta[s] for s in xception_arch.WIDTH_SLOTS),
      target=target, count_params=lambda w: xception_costs.xception_param_counts(at(w))[0],
      slot_names=xception_arch.WIDTH_SLOTS)
  return at(solution.widths).validated()
