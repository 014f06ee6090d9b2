r"""Collects every run under a folder into one CSV and the spectrum's plots.

  python -m xception_jax.tools.report --root=/runs/spectrum [--out=/runs/spectrum/report]

A run is any folder holding the main job's config.json (plus run.json and metrics.jsonl as they
appear); sweeps (launch/sweep.py) make one per grid point, but hand-started runs count too. The
settings come from the resolved config.json, so the report needs no knowledge of how a run was
started. Outputs, in --out (default ROOT/report):

  runs.csv       one row per run: settings, status, parameters (counted at init) and analytic
                 multiply-adds, final and best value of every eval metric, final train loss,
                 measured training images/s.
  curves/*.png   training curves of each run: losses, and eval accuracy (or MAP@100) by step.
  curves.png     every run's train loss and headline metric on one figure.
  spectrum.png   final headline metric against log2(segments of the middle flow's spatial
                 convs), mean +- std over seeds, one curve per budget mode (and per other
                 setting that varies).
  tradeoffs.png  headline metric against parameters, multiply-adds and measured images/s.

The headline metric is the run's `best_metric` (default eval/ema_top1, or eval/ema_map100 for
multi-label data). "final" is the value at the last evaluation, which for a finished run is at
its last step; "best" is the best over all evaluations. Plots use finished runs only (an
unfinished run's last value is not comparable) unless --include_unfinished.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import csv
import io
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging

from xception_jax import paths
from xception_jax.tools import report_plots
from xception_jax.tools import runs

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Folder searched (recursively) for run workdirs.")
flags.DEFINE_string("out", None, "Output folder (default: ROOT/report).")
flags.DEFINE_bool("include_unfinished", False, "Also plot runs that have not reached total_steps.")

# Settings read from config.json, in CSV order. `model.*` are model keyword arguments.
SETTING_COLUMNS = (
  "model_name",
  "segments",
  "order",
  "mid_activation",
  "residual",
  "budget",
  "seed",
  "dataset",
  "image_size",
  "batch_size",
)


# ----------------------------------------------------------------------------------------------
# CSV.
# ----------------------------------------------------------------------------------------------

_FIRST_COLUMNS = (
  "run",
  "status",
  "step",
  "total_steps",
  *SETTING_COLUMNS,
  "params",
  "analytic_params",
  "macs",
  "middle_segments",
  "devices",
  "images_per_sec",
  "headline_metric",
  "final",
  "best",
)


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> list[str]:
  """Writes the rows; returns the column names (fixed ones first, then metric columns sorted)."""
  metric_columns = sorted({k for row in rows for k in row if k.startswith(("final_", "best_"))})
  columns = list(_FIRST_COLUMNS) + metric_columns
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
  paths.write_text(path, text.getvalue())
  return columns


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def write_report(
  root: str, out: str | None = None, include_unfinished: bool = False
) -> dict[str, Any]:
  """Writes runs.csv and the plots; returns {'rows', 'csv', 'plots'} (paths written)."""
  root = os.fspath(paths.resolve(root))
  out = os.fspath(paths.resolve(out or os.path.join(root, "report")))
  rows = runs.collect(root)
  if not rows:
    raise FileNotFoundError(
      f"No runs under {root!r}: a run is a folder with config.json "
      "(python -m xception_jax.main --workdir=... writes it)."
    )
  paths.makedirs(os.path.join(out, "curves"))
  csv_path = os.path.join(out, "runs.csv")
  write_csv(rows, csv_path)
  plots = []
  for row in rows:
    path = os.path.join(out, "curves", _slug(row["run"]) + ".png")
    report_plots.plot_run_curves(row, path)
    plots.append(path)

  plotted = runs.plotted_rows(rows, include_unfinished)
  if plotted:
    metric = collections.Counter(r["headline_metric"] for r in plotted).most_common(1)[0][0]
    same_metric = [r for r in plotted if r["headline_metric"] == metric]
    if len(same_metric) < len(plotted):
      logging.warning(
        "Plotting the %d runs judged by %s; %d others use another metric.",
        len(same_metric),
        metric,
        len(plotted) - len(same_metric),
      )
    report_plots.plot_all_curves(same_metric, os.path.join(out, "curves.png"), metric)
    plots.append(os.path.join(out, "curves.png"))
    if any(r.get("middle_segments") for r in same_metric):
      report_plots.plot_spectrum(same_metric, os.path.join(out, "spectrum.png"), metric)
      report_plots.plot_tradeoffs(same_metric, os.path.join(out, "tradeoffs.png"), metric)
      plots += [os.path.join(out, "spectrum.png"), os.path.join(out, "tradeoffs.png")]
  else:
    logging.warning(
      "No finished runs with eval metrics under %s: only runs.csv and per-run "
      "curves written (--include_unfinished plots the others).",
      root,
    )
  return {"rows": rows, "csv": csv_path, "plots": plots}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.root:
    raise app.UsageError("--root=DIR is required (a sweep's --workdir_root, or any run folder).")
  try:
    result = write_report(FLAGS.root, FLAGS.out, FLAGS.include_unfinished)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  finished = sum(r["status"] == "finished" for r in result["rows"])
  print(f"{len(result['rows'])} runs ({finished} finished) -> {result['csv']}")
  for path in result["plots"]:
    print(f"  {path}")


if __name__ == "__main__":
  app.run(main)
