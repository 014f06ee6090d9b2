"""A folder of runs, read: one row per run (settings, status, costs, metrics) and their groups.

What `tools/report.py` writes (runs.csv, the plots) is computed here, from the files a run leaves
in its workdir (config.json, run.json, metrics.jsonl, checkpoints/), so the report needs no
knowledge of how a run was started: sweeps (launch/sweep.py) and hand-started runs read the same.
Local folders and cloud URLs (gs://...) alike.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import json
import math
import os
import statistics
from typing import Any

from absl import logging

from xception_jax import models
from xception_jax import paths
from xception_jax import workdir as workdir_lib
from xception_jax.models import costs
from xception_jax.models import xception_arch

# Settings that tell plot curves apart (segments is the x axis, seed is averaged over).
GROUP_SETTINGS = (
  "model_name",
  "budget",
  "order",
  "mid_activation",
  "residual",
  "dataset",
  "image_size",
  "batch_size",
)
_SKIP_DIRS = {"checkpoints", "tensorboard", "report"}


def find_runs(root: str) -> list[str]:
  """Workdirs under `root` (a folder with config.json), sorted; `root` itself may be one.

  `root` may be local or a cloud URL (gs://...), as may everything read and written here.
  """
  if not paths.Path(root).is_dir():
    raise FileNotFoundError(f"--root={root!r} is not a folder.")
  found, folders = [], [paths.Path(root)]
  while folders:
    folder = folders.pop()
    entries = list(folder.iterdir())
    if any(e.name == "config.json" for e in entries):
      found.append(os.fspath(folder))  # a run's own folders hold no further runs
    else:
      folders += [e for e in entries if e.name not in _SKIP_DIRS and e.is_dir()]
  return sorted(found)


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """metrics.jsonl as a list of records (a torn last line, from a killed run, is ignored)."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not paths.Path(path).exists():
    return records
  with paths.Path(path).open() as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s:%d is not JSON (a run killed mid-write?); ignored.", path, number)
  return records


def _read_json(path: str) -> dict[str, Any]:
  if not paths.Path(path).exists():
    return {}
  return paths.read_json(path)


def headline_metric(config: dict[str, Any], run_info: dict[str, Any]) -> str:
  """The metric a run is judged by: its best_metric, as the trainer picks it."""
  if config.get("best_metric"):
    return config["best_metric"]
  return "eval/ema_map100" if run_info.get("multi_label") else "eval/ema_top1"


def lower_is_better(metric: str) -> bool:
  return "loss" in metric


def metric_series(records: Sequence[dict[str, float]]) -> dict[str, list[tuple[int, float]]]:
  """name -> [(step, value)] in step order, as of the run's latest attempt.

  A resumed run restarts from its last checkpoint, so the records an earlier attempt wrote after
  that checkpoint are superseded: a record at step s drops every earlier one at steps >= s.
  """
  series = collections.defaultdict(list)
  for record in records:
    step = int(record["step"])
    for name, value in record.items():
      if name == "step" or not isinstance(value, (int, float)):
        continue
      points = series[name]
      while points and points[-1][0] >= step:
        points.pop()
      points.append((step, float(value)))
  return dict(series)


def summarize_metrics(records: Sequence[dict[str, float]]) -> dict[str, Any]:
  """Final and best value of every eval metric, final train loss, and training images/s.

  images/s is the median over log intervals, leaving out the first one when there are more
  (it includes compilation).
  """
  series = metric_series(records)
  out: dict[str, Any] = {}
  for name, points in sorted(series.items()):
    if not name.startswith("eval/") or name == "eval/examples":
      continue
    values = [v for _, v in points if math.isfinite(v)]
    out[f"final_{name}"] = points[-1][1]
    if values:
      out[f"best_{name}"] = min(values) if lower_is_better(name) else max(values)
  if series.get("train/loss"):
    out["final_train/loss"] = series["train/loss"][-1][1]
  speeds = [v for _, v in series.get("train/images_per_sec", [])]
  if len(speeds) > 1:
    speeds = speeds[1:]
  out["images_per_sec"] = statistics.median(speeds) if speeds else None
  return out


def analytic_cost(config: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
  """Analytic MACs and the middle flow's segment count G, from the model settings.

  G is what the spectrum plot's x axis shows: for 'depthwise' it is the middle flow's channel
  count (728 for Xception), so depthwise sits at the far right of the same log2 axis. Models
  without analytic formulas (Inception V3) get None.
  """
  kwargs = dict(config.get("model") or {})
  if kwargs.get("budget") in ("", "none"):
    kwargs["budget"] = None  # configs spell "no budget" as ""
  if num_classes:
    kwargs["num_classes"] = int(num_classes)
  try:
    cost = costs.model_cost(config["model_name"], image_size=int(config["image_size"]), **kwargs)
  except (ValueError, TypeError, KeyError) as e:
    logging.info("No analytic cost for %s: %s", config.get("model_name"), e)
    return {"macs": None, "middle_segments": None, "analytic_params": None}
  arch = cost.architecture
  middle = [
    layer.name
    for layer in xception_arch.separable_layers(arch.num_middle_blocks)
    if layer.flow == "middle"
  ]
  layer = middle[0] if middle else arch.layer_segments[-1][0]
  return {
    "macs": cost.macs_total,
    "middle_segments": arch.segments(layer),
    "analytic_params": cost.params,
  }


def collect_run(workdir: str, root: str) -> dict[str, Any]:
  """One CSV row: settings, status, costs and metric summary of the run in `workdir`."""
  config = _read_json(os.path.join(workdir, "config.json"))
  run_info = _read_json(os.path.join(workdir, "run.json"))
  model = config.get("model") or {}
  steps = workdir_lib.checkpoint_steps(workdir)
  total = run_info.get("total_steps")
  records = read_metrics(workdir)
  last_step = max([int(r["step"]) for r in records] + steps, default=0)
  row: dict[str, Any] = {
    "run": os.path.relpath(workdir, root)
    if workdir.rstrip("/") != root.rstrip("/")
    else paths.Path(workdir).name,
    "model_name": config.get("model_name"),
    "segments": models.segments_label(model.get("segments")) if "model_name" in config else None,
    "order": model.get("order", "depthwise_first"),
    "mid_activation": model.get("mid_activation", "none"),
    "residual": model.get("residual", True),
    "budget": model.get("budget") or "none",
    "seed": config.get("seed"),
    "dataset": run_info.get("dataset", config.get("dataset")),
    "image_size": config.get("image_size"),
    "batch_size": config.get("batch_size"),
    "status": "finished" if (total is not None and steps and steps[-1] >= total) else "unfinished",
    "step": last_step,
    "total_steps": total,
    "params": run_info.get("num_params"),
    "devices": run_info.get("devices"),
    "headline_metric": headline_metric(config, run_info),
  }
  if config.get("model_name"):
    row.update(analytic_cost(config, run_info.get("num_classes")))
  row.update(summarize_metrics(records))
  row["final"] = row.get(f"final_{row['headline_metric']}")
  row["best"] = row.get(f"best_{row['headline_metric']}")
  row["_records"] = records
  return row


def collect(root: str) -> list[dict[str, Any]]:
  """Rows of every run under `root`."""
  return [collect_run(workdir, root) for workdir in find_runs(root)]


def group_key(row: dict[str, Any]) -> tuple:
  return tuple(row.get(k) for k in GROUP_SETTINGS)


def group_labels(rows: Sequence[dict[str, Any]]) -> dict[tuple, str]:
  """Short names for the curve groups: the settings that differ between them (budget always)."""
  keys = sorted({group_key(r) for r in rows}, key=str)
  varying = [
    i for i, name in enumerate(GROUP_SETTINGS) if name == "budget" or len({k[i] for k in keys}) > 1
  ]

  def name(key, i):
    setting = GROUP_SETTINGS[i]
    return (
      str(key[i]) if setting == "model_name" else f"{_SHORT_NAMES.get(setting, setting)}={key[i]}"
    )

  return {k: ", ".join(name(k, i) for i in varying) for k in keys}


_SHORT_NAMES = {"mid_activation": "mid", "image_size": "size", "batch_size": "batch"}


def plotted_rows(rows: Sequence[dict[str, Any]], include_unfinished: bool) -> list[dict[str, Any]]:
  """The rows the figures compare: with a headline value, and finished (an unfinished run's
  last value is not comparable) unless include_unfinished."""
  return [
    r
    for r in rows
    if r.get("final") is not None and (include_unfinished or r["status"] == "finished")
  ]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spectrum_points(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Per curve label: points {segments, G, x=log2 G, mean, std, n, params, macs, images_per_sec}
  sorted by G, averaging the final headline metric over seeds."""
  rows = [row for row in rows if row.get("middle_segments")]
  labels = group_labels(rows)
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(labels[group_key(row)], row["segments"], row["middle_segments"])].append(row)
  curves = collections.defaultdict(list)
  for (label, segments, g), members in groups.items():
    mean, std = _mean_std([m["final"] for m in members])
    speeds = [m["images_per_sec"] for m in members if m.get("images_per_sec")]
    curves[label].append(
      {
        "segments": segments,
        "G": g,
        "x": math.log2(g),
        "mean": mean,
        "std": std,
        "n": len(members),
        "params": statistics.fmean(m["params"] for m in members if m.get("params"))
        if any(m.get("params") for m in members)
        else None,
        "macs": members[0].get("macs"),
        "images_per_sec": statistics.fmean(speeds) if speeds else None,
        "images_per_sec_std": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
      }
    )
  return {label: sorted(points, key=lambda p: p["G"]) for label, points in sorted(curves.items())}
