"""The report's figures: per-run training curves, every run's curves, the spectrum, trade-offs.

Drawn with matplotlib's Agg backend (files only, no display) from the rows of `tools/runs.py`;
written through `paths`, so a report folder may be on gs:// too. What each figure shows is
described in `tools/report.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from xception_jax import paths  # pylint: disable=g-import-not-at-top
from xception_jax.tools import runs  # pylint: disable=g-import-not-at-top


def _series(records: Sequence[dict[str, float]], name: str) -> tuple[list[int], list[float]]:
  points = runs.metric_series(records).get(name, [])
  return [s for s, _ in points], [v for _, v in points]


def _metric_label(metric: str) -> str:
  names = {
    "top1": "top-1 accuracy",
    "top5": "top-5 accuracy",
    "map100": "MAP@100",
    "precision_at_1": "precision@1",
    "loss": "loss",
  }
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
  names = (
    ("train/precision_at_1", "eval/precision_at_1", "eval/map100", "eval/ema_map100")
    if multi_label
    else ("train/top1", "eval/top1", "eval/ema_top1", "eval/top5")
  )
  for name in names:
    steps, values = _series(records, name)
    if steps:
      ax_acc.plot(steps, values, "-" if name.startswith("train/") else "o-", label=name)
  ax_acc.set(
    xlabel="step",
    ylabel="MAP@100 / precision@1" if multi_label else "accuracy",
    title="Accuracy" if not multi_label else "Multi-label metrics",
  )
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(
    f"{row['run']}: G={row['segments']}, budget={row['budget']}, seed={row['seed']} "
    f"({row['status']}, step {row['step']}/{row['total_steps']})",
    fontsize=10,
  )
  fig.tight_layout()
  _savefig(fig, path, dpi=100)
  plt.close(fig)


def _setting_color(index: int):
  return plt.get_cmap("tab10")(index % 10)


def plot_all_curves(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Every run's train loss and headline metric; one colour per setting, seeds share it."""
  labels = runs.group_labels(rows)
  settings = sorted({(labels[runs.group_key(r)], r["segments"]) for r in rows}, key=str)
  colors = {s: _setting_color(i) for i, s in enumerate(settings)}
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 4.5))
  shown = set()
  for row in rows:
    setting = (labels[runs.group_key(row)], row["segments"])
    label = f"G={setting[1]}, {setting[0]}" if setting not in shown else None
    shown.add(setting)
    steps, values = _series(row["_records"], "train/loss")
    ax_loss.plot(steps, values, "-", color=colors[setting], alpha=0.8, label=label)
    steps, values = _series(row["_records"], metric)
    ax_acc.plot(steps, values, "o-", color=colors[setting], alpha=0.8)
  ax_loss.set(xlabel="step", ylabel="train loss", title="Training loss (one line per run)")
  ax_acc.set(
    xlabel="step",
    ylabel=f"{metric} ({_metric_label(metric)})",
    title=f"Eval {_metric_label(metric)} (one line per run)",
  )
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  fig.tight_layout()
  # Outside the axes, right of them; bbox_inches="tight" widens the image to hold it.
  fig.legend(
    loc="upper left",
    bbox_to_anchor=(1.0, 0.95),
    fontsize=8,
    title="setting (seeds share a colour)",
    title_fontsize=8,
  )
  _savefig(fig, path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def _tick_label(point: dict[str, Any]) -> str:
  if point["segments"] == "depthwise":
    return f"depthwise\n(G={point['G']})"
  return f"{point['segments']}"


def plot_spectrum(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Final headline metric against log2(G), mean +- std over seeds, one curve per group."""
  curves = runs.spectrum_points(rows)
  fig, ax = plt.subplots(figsize=(8, 5))
  ticks = {}
  for i, (label, points) in enumerate(curves.items()):
    xs = [p["x"] for p in points]
    ax.errorbar(
      xs,
      [p["mean"] for p in points],
      yerr=[p["std"] for p in points],
      fmt="o-",
      capsize=4,
      color=_setting_color(i),
      label=f"{label} (n={'/'.join(str(n) for n in sorted({p['n'] for p in points}))} seeds)",
    )
    for p in points:
      ticks[p["x"]] = _tick_label(p)
  ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
  secondary = ax.secondary_xaxis("top")
  secondary.set_xticks(sorted(ticks), [f"{x:.1f}" for x in sorted(ticks)])
  secondary.set_xlabel("log2(G)")
  ax.set(
    xlabel="segments G of the middle flow's 3x3 convs (1 = regular conv; depthwise: G = channels)",
    ylabel=f"final {metric}\n({_metric_label(metric)}, mean ± std over seeds)",
  )
  ax.set_title("The spectrum: regular convolution → depthwise separable", pad=30)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _savefig(fig, path, dpi=100)
  plt.close(fig)


def plot_tradeoffs(rows: Sequence[dict[str, Any]], path: str, metric: str) -> None:
  """Headline metric against parameters, MACs and measured images/s (mean over seeds)."""
  curves = runs.spectrum_points(rows)
  panels = (
    ("params", "parameters", "parameters", True),
    ("macs", "multiply-adds per image (analytic)", "multiply-adds", True),
    ("images_per_sec", "measured training images/s (all devices)", "speed", False),
  )
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
  for ax, (key, xlabel, short, log_x) in zip(axes, panels):
    for i, (label, points) in enumerate(curves.items()):
      points = [p for p in points if p.get(key)]
      if not points:
        continue
      xs, ys = [p[key] for p in points], [p["mean"] for p in points]
      xerr = [p["images_per_sec_std"] for p in points] if key == "images_per_sec" else None
      ax.errorbar(
        xs,
        ys,
        yerr=[p["std"] for p in points],
        xerr=xerr,
        fmt="o",
        capsize=3,
        color=_setting_color(i),
        label=label,
      )
      for p, x, y in zip(points, xs, ys):
        ax.annotate(
          "dw" if p["segments"] == "depthwise" else f"G={p['segments']}",
          (x, y),
          textcoords="offset points",
          xytext=(5, 5),
          fontsize=8,
        )
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
