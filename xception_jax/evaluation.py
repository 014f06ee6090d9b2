"""What an evaluation reports, and one exact pass over the eval split.

Every evaluation reports the same metrics for the raw and the EMA weights (`eval_metric_names`);
`config.best_metric` picks the one that ranks checkpoints (`resolve_best_metric`). `evaluate`
runs the compiled eval step (`steps.make_eval_step`) over every eval batch and turns the exact
sums into means: padding examples (mask 0) count nowhere, whatever the batch and process counts.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import logging
import jax
import ml_collections

from xception_jax import data
from xception_jax import metrics
from xception_jax import steps


def eval_metric_names(multi_label: bool) -> tuple[str, ...]:
  """The metrics `evaluate` reports (raw and EMA weights)."""
  names = ("loss", "precision_at_1", "map100") if multi_label else ("loss", "top1", "top5")
  return tuple(f"eval/{prefix}{name}" for prefix in ("", "ema_") for name in names)


def resolve_best_metric(config: ml_collections.ConfigDict, multi_label: bool) -> str:
  """config.best_metric, defaulting to EMA top-1 (single-label) or EMA MAP@100 (multi-label).

  A loss is minimised, anything else maximised (checkpointing.best_mode).
  """
  default = "eval/ema_map100" if multi_label else "eval/ema_top1"
  metric = config.best_metric or default
  valid = eval_metric_names(multi_label)
  if metric not in valid:
    kind = "multi-label" if multi_label else "single-label"
    raise ValueError(
      f"config.best_metric={config.best_metric!r}: this {kind} dataset's evals "
      f'report {", ".join(valid)} ("" = {default}).'
    )
  return metric


def evaluate(
  eval_step: Callable,
  state: steps.TrainState,
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  sharding: jax.sharding.Sharding,
) -> dict[str, float]:
  """One exact pass over the eval split; returns `eval_metric_names` for raw and EMA weights,
  plus 'eval/examples'. `sharding` lays out the global eval batches (the data axis)."""
  map_states = (
    {"": metrics.map_init(info.num_classes), "ema_": metrics.map_init(info.num_classes)}
    if info.multi_label
    else {}
  )
  totals: dict[str, float] = {}
  for batch in data.create_eval_iterator(config, info, sharding=sharding):
    sums, map_states = eval_step(state, batch, map_states)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  results = {}
  for prefix in ("", "ema_"):
    count = totals[prefix + "count"]
    if int(count) != info.num_eval_examples:
      logging.warning("Evaluated %d examples but the split has %d.", count, info.num_eval_examples)
    results[f"eval/{prefix}loss"] = totals[prefix + "loss"] / count
    if info.multi_label:
      results[f"eval/{prefix}precision_at_1"] = totals[prefix + "precision_at_1"] / count
      results[f"eval/{prefix}map100"] = float(
        metrics.map_result(map_states[prefix], config.map_class_weighting)
      )
    else:
      results[f"eval/{prefix}top1"] = totals[prefix + "top1"] / count
      results[f"eval/{prefix}top5"] = totals[prefix + "top5"] / count
  results["eval/examples"] = totals["count"]
  return results
