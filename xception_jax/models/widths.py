"""Channel widths under a width multiplier, rounded the same way in every network.

Xception's slots (`xception_arch`) and Inception V3's convs (`inception_v3`) both scale their
reference widths with `width_multiplier`; one rounding rule keeps narrow variants comparable and
their channel counts friendly to the hardware (multiples of 8).
"""

from __future__ import annotations

WIDTH_QUANTUM = 8  # widths from a multiplier (or Xception's budget solver) are multiples of 8


def scaled_width(width: int, width_multiplier: float) -> int:
  """`width * width_multiplier` rounded to a multiple of WIDTH_QUANTUM (at least one quantum).

  Exact at 1.0: widths given explicitly (Xception's `widths=`) are kept as they are, multiples of
  8 or not.
  """
  if width_multiplier == 1.0:
    return width
  return max(WIDTH_QUANTUM, round(width * width_multiplier / WIDTH_QUANTUM) * WIDTH_QUANTUM)
