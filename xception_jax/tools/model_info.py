r"""Parameters, batch-statistic entries and multiply-adds of an Xception configuration.

Answers "how big and how expensive is this point of the spectrum?" without building, initialising
or compiling a model (the costs are analytic, see `xception_jax.models.costs`).

  python -m xception_jax.tools.model_info --model=xception
  python -m xception_jax.tools.model_info --model=xception --segments=4 --image-size=299
  python -m xception_jax.tools.model_info --model=xception --sweep-segments
  python -m xception_jax.tools.model_info --model=xception --sweep-segments --budget=params \
      --csv=/tmp/sweep.csv

`--segments` takes an int, "depthwise", or a per-flow list "entry=4,middle=8,exit=depthwise".
`--sweep-segments` prints one row per valid uniform segment count (those dividing every separable
layer's spatial channels, plus "depthwise"); with `--budget` the widths are re-chosen per row by
the budget solver, so the candidates are powers of two up to 64 plus "depthwise" (or the list in
`--sweep-candidates`) and rows the solver cannot fit within +-1% are reported and skipped.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Any

from xception_jax.models import costs
from xception_jax.models import xception_arch

BUDGET_SWEEP_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, "depthwise")


def parse_segments(text: str | None) -> Any:
  """"4" -> 4, "depthwise" -> "depthwise", "entry=4,middle=8" -> {"entry": 4, "middle": 8}."""
  if text is None:
    return None

  def value(v: str) -> Any:
    v = v.strip()
    return int(v) if v.isdigit() else v

  if "=" not in text:
    return value(text)
  result = {}
  for item in text.split(","):
    flow, sep, v = item.partition("=")
    if not sep:
      raise ValueError(f"per-flow setting {text!r}: expected flow=value items, got {item!r}")
    result[flow.strip()] = value(v)
  return result


def parse_image_size(text: str) -> tuple[int, int]:
  """"299" -> (299, 299); "320x240" -> (320, 240) as (height, width)."""
  parts = text.lower().split("x")
  if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--image-size={text!r}: expected an int or HEIGHTxWIDTH")
  sizes = [int(p) for p in parts]
  return (sizes[0], sizes[-1])


def parse_budget(text: str | None) -> Any:
  if text is None or text.lower() in ("", "none"):
    return None
  if text == "params":
    return "params"
  if text.replace(",", "").replace("_", "").isdigit():
    return int(text.replace(",", "").replace("_", ""))
  raise ValueError(f"--budget={text!r}: expected 'params' or a parameter count")


def _segments_label(segments: Any) -> str:
  if segments is None:
    return "depthwise"
  if isinstance(segments, dict):
    return ",".join(f"{k}={v}" for k, v in segments.items())
  return str(segments)


def sweep_segments(name: str = "xception", image_size: int | tuple[int, int] = 299, *,
                   budget: Any = None, candidates=None, **kwargs: Any) -> list[dict[str, Any]]:
  """One row per uniform segment count: its costs, widths and (with a budget) the achieved ratio.

  Args:
    name: registry name of an Xception model.
    image_size: input size for the MACs.
    budget: None (widths as configured), "params" or an int parameter target.
    candidates: segment counts to try; default: without a budget, every count that divides all
      separable layers at the configured widths, with a budget BUDGET_SWEEP_CANDIDATES.
    **kwargs: other model settings (order, width_multiplier, num_middle_blocks, fc_layers, ...).

  Returns:
    Rows (dicts) with segments, params, batch_stat_entries, macs_total, macs_<stage>, widths,
    budget_target and ratio. With a budget, counts the solver cannot fit are left out (a note is
    printed to stderr).
  """
  for key in ("segments", "group_width"):
    if key in kwargs:
      raise ValueError(f"sweep_segments sets segments itself; do not pass {key}")
  if candidates is None:
    if budget is None:
      arch = costs.model_cost(name, image_size, **kwargs).architecture
      candidates = [*xception_arch.valid_uniform_segments(arch.widths, arch.order,
                                                           arch.num_middle_blocks), "depthwise"]
    else:
      candidates = BUDGET_SWEEP_CANDIDATES
  rows = []
  for segments in candidates:
    try:
      cost = costs.model_cost(name, image_size, segments=segments, budget=budget, **kwargs)
    except ValueError as e:
      if budget is None:
        raise
      print(f"segments={segments}: skipped, {e}", file=sys.stderr)
      continue
    arch = cost.architecture
    rows.append(dict(
        segments=segments,
        params=cost.params,
        batch_stat_entries=cost.batch_stat_entries,
        macs_total=cost.macs_total,
        **{f"macs_{stage}": macs for stage, macs in cost.macs_per_stage.items()},
        widths=arch.widths,
        budget_target=arch.budget_target,
        ratio=None if arch.budget_target is None else cost.params / arch.budget_target,
    ))
  return rows


def format_cost(cost: costs.ModelCost, settings: dict[str, Any]) -> str:
  """The human-readable report of one configuration."""
  arch = cost.architecture
  lines = [
      f"model               {cost.model}",
      f"settings            {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'}",
      f"image size          {cost.image_size[0]}x{cost.image_size[1]}",
      f"parameters          {cost.params:,}",
      f"batch-stat entries  {cost.batch_stat_entries:,}",
  ]
  if arch is not None:
    lines.append("widths              " +
                 " ".join(f"{k}={v}" for k, v in arch.widths_by_slot.items()))
    segment_counts = sorted({g for _, g in arch.layer_segments})
    lines.append(f"segment counts      {', '.join(map(str, segment_counts))} "
                 f"(spatial convs of the {len(arch.layer_segments)} separable layers)")
    if arch.budget_target is not None:
      lines.append(f"budget              target {arch.budget_target:,} parameters, achieved "
                   f"{cost.params / arch.budget_target:.4f} x")
    lines.append("multiply-adds per image")
  else:
    lines.append("multiply-adds per image (XLA cost analysis / 2: includes batch norm and "
                 "pooling, skips padding taps)")
  for stage, macs in cost.macs_per_stage.items():
    if stage != "total":
      lines.append(f"  {stage:<8}{macs:>17,}  ({macs / 1e9:.3f} G)")
  lines.append(f"  {'total':<8}{cost.macs_total:>17,}  ({cost.macs_total / 1e9:.3f} G)")
  return "\n".join(lines)


def format_sweep(rows: list[dict[str, Any]], with_budget: bool) -> str:
  """The sweep as an aligned text table."""
  header = ["segments", "params", "GMACs"] + (["ratio", "widths"] if with_budget else [])
  table = [header]
  for row in rows:
    cells = [str(row["segments"]), f"{row['params']:,}", f"{row['macs_total'] / 1e9:.3f}"]
    if with_budget:
      cells += [f"{row['ratio']:.4f}", " ".join(map(str, row["widths"]))]
    table.append(cells)
  widths = [max(len(r[i]) for r in table) for i in range(len(header))]
  return "\n".join("  ".join(c.rjust(w) if i < len(header) - 1 or not with_budget else c
                             for i, (c, w) in enumerate(zip(r, widths))) for r in table)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  if not rows:
    raise ValueError("no rows to write")
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
      writer.writerow({**row, "widths": " ".join(map(str, row["widths"]))})


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m xception_jax.tools.model_info",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="xception", help="registry name (xception, xception_small, ..)")
  p.add_argument("--segments", help="int, 'depthwise', or per flow: entry=4,middle=8,exit=16")
  p.add_argument("--group-width",
                 help="channels per segment (int or per flow); excludes --segments")
  p.add_argument("--order", choices=["depthwise_first", "pointwise_first"])
  p.add_argument("--width-multiplier", type=float)
  p.add_argument("--num-middle-blocks", type=int)
  p.add_argument("--num-classes", type=int, help="0 = headless")
  p.add_argument("--fc-layers", help="comma-separated widths of FC layers, e.g. 4096,4096")
  p.add_argument("--no-residual", action="store_true", help="drop the shortcut connections")
  p.add_argument("--budget", help="'params' (Xception's count) or a target parameter count")
  p.add_argument("--image-size", default="299", help="int or HEIGHTxWIDTH (default 299)")
  p.add_argument("--exclude-padding", action="store_true",
                 help="count only kernel taps inside the input (as XLA's cost analysis does)")
  p.add_argument("--sweep-segments", action="store_true",
                 help="one row per valid uniform segment count")
  p.add_argument("--sweep-candidates", help="comma-separated segment counts for --sweep-segments")
  p.add_argument("--csv", metavar="FILE", help="with --sweep-segments: also write the rows here")
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    settings: dict[str, Any] = {}
    if args.segments is not None:
      settings["segments"] = parse_segments(args.segments)
    if args.group_width is not None:
      settings["group_width"] = parse_segments(args.group_width)
    for key in ("order", "width_multiplier", "num_middle_blocks", "num_classes"):
      if getattr(args, key) is not None:
        settings[key] = getattr(args, key)
    if args.fc_layers:
      try:
        settings["fc_layers"] = tuple(int(v) for v in args.fc_layers.split(","))
      except ValueError:
        raise ValueError(f"--fc-layers={args.fc_layers!r}: comma-separated positive widths, "
                         "e.g. 4096,4096") from None
    if args.no_residual:
      settings["residual"] = False
    budget = parse_budget(args.budget)
    image_size = parse_image_size(args.image_size)
    if args.csv and not args.sweep_segments:
      raise ValueError("--csv writes the --sweep-segments table; add --sweep-segments")
    csv_folder = os.path.dirname(os.path.abspath(args.csv)) if args.csv else ""
    if args.csv and not os.path.isdir(csv_folder):
      raise ValueError(f"--csv={args.csv}: the folder {csv_folder} does not exist")

    if not args.sweep_segments:
      if args.model.startswith("xception"):
        cost = costs.model_cost(args.model, image_size, budget=budget,
                                exclude_padding=args.exclude_padding, **settings)
      elif budget is not None or args.exclude_padding:
        raise ValueError(f"--budget and --exclude-padding apply to Xception models, not "
                         f"{args.model!r}")
      else:
        cost = costs.counted_cost(args.model, image_size, **settings)
      shown = {**settings, **({"budget": budget} if budget is not None else {})}
      print(format_cost(cost, shown))
      return 0

    candidates = None
    if args.sweep_candidates:
      candidates = [parse_segments(v) for v in args.sweep_candidates.split(",")]
    rows = sweep_segments(args.model, image_size, budget=budget, candidates=candidates,
                          exclude_padding=args.exclude_padding, **settings)
    print(f"{args.model} at {image_size[0]}x{image_size[1]}"
          + (f", budget={budget}" if budget is not None else "")
          + (f", {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else ""))
    print(format_sweep(rows, with_budget=budget is not None))
    if args.csv:
      write_csv(rows, args.csv)
      print(f"wrote {len(rows)} rows to {args.csv}")
    return 0
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
