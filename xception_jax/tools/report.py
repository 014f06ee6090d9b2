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
import csv
import io
import json
import math
import os
import statistics
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top

from xception_jax import paths  # pylint: disable=g-import-not-at-top
from xception_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Folder searched (recursively) for run workdirs.")
flags.DEFINE_string("out", None, "Output folder (default: ROOT/report).")
flags.DEFINE_bool("include_unfinished", False, "Also plot runs that have not reached total_steps.")

# Settings read from config.json, in CSV order. `model.*` are model keyword arguments.
SETTING_COLUMNS = ("model_name", "segments", "order", "mid_activation", "residual", "budget",
                   "seed", "dataset", "image_size", "batch_size")
# Settings that tell plot curves apart (segments is the x axis, seed is averaged over).
GROUP_SETTINGS = ("model_name", "budget", "order", "mid_activation", "residual", "dataset",
                  "image_size", "batch_size")
_SKIP_DIRS = {"checkpoints", "tensorboard", "report"}


# ----------------------------------------------------------------------------------------------
# Reading runs.
# ----------------------------------------------------------------------------------------------


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


def checkpoint_steps(workdir: str) -> list[int]:
  return workdir_lib.checkpoint_steps(workdir)


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


def _segments_label(segments: Any) -> str:
  if segments is None or (isinstance(segments, str) and segments.lower() == "depthwise"):
    return "depthwise"
  return str(segments)


def analytic_cost(config: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
  """Analytic MACs and the middle flow's segment count G, from the model settings.

  G is what the spectrum plot's x axis shows: for 'depthwise' it is the middle flow's channel
  count (728 for Xception), so depthwise sits at the far right of the same log2 axis. Models
  without analytic formulas (Inception V3) get None.
  """
  from xception_jax.models import costs  # pylint: disable=g-import-not-at-top  (imports JAX)
  from xception_jax.models import xception_arch  # pylint: disable=g-import-not-at-top
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
  middle = [layer.name for layer in xception_arch.separable_layers(arch.num_middle_blocks)
            if layer.flow == "middle"]
  layer = middle[0] if middle else arch.layer_segments[-1][0]
  return {"macs": cost.macs_total, "middle_segments": arch.segments(layer),
          "analytic_params": cost.params}


def collect_run(workdir: str, root: str) -> dict[str, Any]:
  """One CSV row: settings, status, costs and metric summary of the run in `workdir`."""
  config = _read_json(os.path.join(workdir, "config.json"))
  run_info = _read_json(os.path.join(workdir, "run.json"))
  model = config.get("model") or {}
  steps = checkpoint_steps(workdir)
  total = run_info.get("total_steps")
  records = read_metrics(workdir)
  last_step = max([int(r["step"]) for r in records] + steps, default=0)
  row: dict[str, Any] = {
      "run": os.path.relpath(workdir, root) if workdir.rstrip("/") != root.rstrip("/")
             else paths.Path(workdir).name,
      "model_name": config.get("model_name"),
      "segments": _segments_label(model.get("segments")) if "model_name" in config else None,
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


# ----------------------------------------------------------------------------------------------
# CSV.
# ----------------------------------------------------------------------------------------------

_FIRST_COLUMNS = ("run", "status", "step", "total_steps", *SETTING_COLUMNS, "params",
                  "analytic_params", "macs", "middle_segments", "devices", "images_per_sec",
                  "headline_metric", "final", "best")


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> list[str]:
  """Writes the rows; returns the column names (fixed ones first, then metric columns sorted)."""
  metric_columns = sorted({k for row in rows for k in row
                           if k.startswith(("final_", "best_"))})
  columns = list(_FIRST_COLUMNS) + metric_columns
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
  paths.write_text(path, text.getvalue())
  return columns


# ----------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------


def _series(records: Sequence[dict[str, float]], name: str) -> tuple[list[int], list[float]]:
  points = metric_series(records).get(name, [])
  return [s for s, _ in points], [v for _, v in points]


def _metric_label(metric: str) -> str:
  names = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "map100": "MAP@100",
           "precision_at_1": "precision@1", "loss": "loss"}
  kind = metric.split("/")[-1]
  ema = kind.startswith("ema_")
  kind = kind[4:] if ema else kind
  return f"{'EMA ' if ema else ''}{names.get(kind, kind)}"


def plot_run_curves(row: dict[str, Any], path: str) -> None:
  """Two panels: losses by step; eval metrics (and train top-1) by step."""
  records = row["_records"]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for name, style in (("train/loss", "-"), ("eval/loss", "o--"), ("eval/ema_loss", "s:")):
    steps, values = _series(records, name)
    if steps:
      ax_loss.plot(steps, values, style, label=name)
  ax_loss.set(xlabel="step", ylabel="cross-entropy loss", title="Loss")
  multi_label = "map100" in row["headline_metric"]
  names = (("train/precision_at_1", "eval/precision_at_1", "eval/map100", "eval/ema_map100")
           if multi_label else ("train/top1", "eval/top1", "eval/ema_top1", "eval/top5"))
  for name in names:
    steps, values = _series(records, name)
    if steps:
      ax_acc.plot(steps, values, "-" if name.startswith("train/") else "o-", label=name)
  ax_acc.set(xlabel="step", ylabel="MAP@100 / precision@1" if multi_label else "accuracy",
             title="Accuracy" if not multi_label else "Multi-label metrics")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(f"{row['run']}: G={row['segments']}, budget={row['budget']}, seed={row['seed']} "
               f"({row['status']}, step {row['step']}/{row['total_steps']})",
               fontsize=10)
  fig.tight_layout()
  _savefig(fig, path, dpi=100)
  plt.close(fig)


def _group_key(row: dict[str, Any]) -> tuple:
  return tuple(row.get(k) for k in GROUP_SETTINGS)


def _group_labels(rows: Sequence[dict[str, Any]]) -> dict[tuple, str]:
  """Short names for the curve groups: the settings that differ between them (budget always)."""
  keys = sorted({_group_key(r) for r in rows}, key=str)
  varying = [i for i, name in enumerate(GROUP_SETTINGS)
             if name == "budget" or len({k[i] for k in keys}) > 1]

  def name(key, i):
    setting = GROUP_SETTINGS[i]
    return str(key[i]) if setting == "model_name" else f"{_SHORT_NAMES.get(setting, setting)}={key[i]}"

  return {k: ", ".join(name(k, i) for i in varying) for k in keys}


_SHORT_NAMES = {"mid_activation": "mid", "image_size": "size", "batch_size": "batch"}


def _setting_color(index: int):
  return plt.get_cmap("tab10")(index % 10)


def _plot_rows(rows: Sequence[dict[str, Any]], include_unfinished: bool) -> list[dict[str, Any]]:
  return [r for r in rows if r.get("final") is not None and
          (include_unfinished or r["status"] == "finished")]


def plot_all_curves(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Every run's train loss and headline metric; one colour per setting, seeds share it."""
  labels = _group_labels(rows)
  settings = sorted({(labels[_group_key(r)], r["segments"]) for r in rows}, key=str)
  colors = {s: _setting_color(i) for i, s in enumerate(settings)}
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 4.5))
  shown = set()
  for row in rows:
    setting = (labels[_group_key(row)], row["segments"])
    label = f"G={setting[1]}, {setting[0]}" if setting not in shown else None
    shown.add(setting)
    steps, values = _series(row["_records"], "train/loss")
    ax_loss.plot(steps, values, "-", color=colors[setting], alpha=0.8, label=label)
    steps, values = _series(row["_records"], metric)
    ax_acc.plot(steps, values, "o-", color=colors[setting], alpha=0.8)
  ax_loss.set(xlabel="step", ylabel="train loss", title="Training loss (one line per run)")
  ax_acc.set(xlabel="step", ylabel=f"{metric} ({_metric_label(metric)})",
             title=f"Eval {_metric_label(metric)} (one line per run)")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  fig.tight_layout()
  # Outside the axes, right of them; bbox_inches="tight" widens the image to hold it.
  fig.legend(loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8,
             title="setting (seeds share a colour)", title_fontsize=8)
  _savefig(fig, path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def spectrum_points(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Per curve label: points {segments, G, x=log2 G, mean, std, n, params, macs, images_per_sec}
  sorted by G, averaging the final headline metric over seeds."""
  rows = [row for row in rows if row.get("middle_segments")]
  labels = _group_labels(rows)
  groups = collections.defaultdict(list)
  for row in rows:
    groups[(labels[_group_key(row)], row["segments"], row["middle_segments"])].append(row)
  curves = collections.defaultdict(list)
  for (label, segments, g), members in groups.items():
    mean, std = _mean_std([m["final"] for m in members])
    speeds = [m["images_per_sec"] for m in members if m.get("images_per_sec")]
    curves[label].append({
        "segments": segments, "G": g, "x": math.log2(g), "mean": mean, "std": std,
        "n": len(members), "params": statistics.fmean(m["params"] for m in members
                                                      if m.get("params")) if any(
                                                          m.get("params") for m in members) else None,
        "macs": members[0].get("macs"),
        "images_per_sec": statistics.fmean(speeds) if speeds else None,
        "images_per_sec_std": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
    })
  return {label: sorted(points, key=lambda p: p["G"]) for label, points in sorted(curves.items())}


def _tick_label(point: dict[str, Any]) -> str:
  if point["segments"] == "depthwise":
    return f"depthwise\n(G={point['G']})"
  return f"{point['segments']}"


def plot_spectrum(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Final headline metric against log2(G), mean +- std over seeds, one curve per group."""
  curves = spectrum_points(rows)
  fig, ax = plt.subplots(figsize=(8, 5))
  ticks = {}
  for i, (label, points) in enumerate(curves.items()):
    xs = [p["x"] for p in points]
    ax.errorbar(xs, [p["mean"] for p in points], yerr=[p["std"] for p in points], fmt="o-",
                capsize=4, color=_setting_color(i),
                label=f"{label} (n={'/'.join(str(n) for n in sorted({p['n'] for p in points}))}"
                      " seeds)")
    for p in points:
      ticks[p["x"]] = _tick_label(p)
  ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
  secondary = ax.secondary_xaxis("top")
  secondary.set_xticks(sorted(ticks), [f"{x:.1f}" for x in sorted(ticks)])
  secondary.set_xlabel("log2(G)")
  ax.set(xlabel="segments G of the middle flow's 3x3 convs (1 = regular conv; depthwise: "
                "G = channels)",
         ylabel=f"final {metric}\n({_metric_label(metric)}, mean ± std over seeds)")
  ax.set_title("The spectrum: regular convolution → depthwise separable", pad=30)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _savefig(fig, path, dpi=100)
  plt.close(fig)


def plot_tradeoffs(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Headline metric against parameters, MACs and measured images/s (mean over seeds)."""
  curves = spectrum_points(rows)
  panels = (("params", "parameters", "parameters", True),
            ("macs", "multiply-adds per image (analytic)", "multiply-adds", True),
            ("images_per_sec", "measured training images/s (all devices)", "speed", False))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
  for ax, (key, xlabel, short, log_x) in zip(axes, panels):
    for i, (label, points) in enumerate(curves.items()):
      points = [p for p in points if p.get(key)]
      if not points:
        continue
      xs, ys = [p[key] for p in points], [p["mean"] for p in points]
      xerr = [p["images_per_sec_std"] for p in points] if key == "images_per_sec" else None
      ax.errorbar(xs, ys, yerr=[p["std"] for p in points], xerr=xerr, fmt="o", capsize=3,
                  color=_setting_color(i), label=label)
      for p, x, y in zip(points, xs, ys):
        ax.annotate("dw" if p["segments"] == "depthwise" else f"G={p['segments']}", (x, y),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    values = [p[key] for points in curves.values() for p in points if p.get(key)]
    if log_x and values and max(values) > 4 * min(values):
      ax.set_xscale("log")  # a spectrum at fixed width spans orders of magnitude
      ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    if key != "images_per_sec":
      ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))  # 158k, 6.4M, 8.4G
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(xlabel=xlabel, title=f"{_metric_label(metric)} vs {short}")
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel(f"final {metric}\n(mean ± std over seeds)")
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
  fig.tight_layout(rect=(0, 0.05 * math.ceil(len(labels) / 3), 1, 1))
  _savefig(fig, path, dpi=100)
  plt.close(fig)


def _savefig(fig, path: str, **kwargs) -> None:
  with paths.Path(path).open("wb") as f:  # local or gs://
    fig.savefig(f, format="png", **kwargs)


def _slug(text: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def write_report(root: str, out: str | None = None,
                 include_unfinished: bool = False) -> dict[str, Any]:
  """Writes runs.csv and the plots; returns {'rows', 'csv', 'plots'} (paths written)."""
  root = os.fspath(paths.resolve(root))
  out = os.fspath(paths.resolve(out or os.path.join(root, "report")))
  rows = collect(root)
  if not rows:
    raise FileNotFoundError(f"No runs under {root!r}: a run is a folder with config.json "
                            "(python -m xception_jax.main --workdir=... writes it).")
  paths.makedirs(os.path.join(out, "curves"))
  csv_path = os.path.join(out, "runs.csv")
  write_csv(rows, csv_path)
  plots = []
  for row in rows:
    path = os.path.join(out, "curves", _slug(row["run"]) + ".png")
    plot_run_curves(row, path)
    plots.append(path)

  plotted = _plot_rows(rows, include_unfinished)
  if plotted:
    metric = collections.Counter(r["headline_metric"] for r in plotted).most_common(1)[0][0]
    same_metric = [r for r in plotted if r["headline_metric"] == metric]
    if len(same_metric) < len(plotted):
      logging.warning("Plotting the %d runs judged by %s; %d others use another metric.",
                      len(same_metric), metric, len(plotted) - len(same_metric))
    plot_all_curves(same_metric, os.path.join(out, "curves.png"), metric)
    plots.append(os.path.join(out, "curves.png"))
    if any(r.get("middle_segments") for r in same_metric):
      plot_spectrum(same_metric, os.path.join(out, "spectrum.png"), metric)
      plot_tradeoffs(same_metric, os.path.join(out, "tradeoffs.png"), metric)
      plots += [os.path.join(out, "spectrum.png"), os.path.join(out, "tradeoffs.png")]
  else:
    logging.warning("No finished runs with eval metrics under %s: only runs.csv and per-run "
                    "curves written (--include_unfinished plots the others).", root)
  return {"rows": rows, "csv": csv_path, "plots": plots}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.root:
    raise app.UsageError("--root=DIR is required (a sweep's --workdir-root, or any run folder).")
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
