"""tools/model_info: the printed report, the segment sweep (each row's analytic parameter count must
equal the count of the module it describes), the CSV, and errors."""

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import models
from xception_jax.models import costs
from xception_jax.tools import model_info


def _counted(name, size=71, **kwargs):
  """(params, batch-stat entries) of the built module, from shapes only."""
  model = models.create(name, **kwargs)
  shapes = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
  )
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  return count(shapes["params"]), count(shapes["batch_stats"])


def test_report_for_xception(capsys):
  assert model_info.main(["--model=xception"]) == 0
  out = capsys.readouterr().out
  assert "22,855,952" in out and "54,528" in out
  assert "8.357 G" in out  # the published ~8.36 G multiply-adds at 299
  for stage in ("stem", "entry", "middle", "exit", "head", "total"):
    assert f"  {stage}" in out


def test_report_for_a_segment_setting_and_budget(capsys):
  assert model_info.main(["--model=xception", "--segments=4", "--image_size=299"]) == 0
  assert "62,890,616" in capsys.readouterr().out  # 34 layers' spatial convs now 9*C*C/4
  assert model_info.main(["--segments=1", "--budget=params"]) == 0
  out = capsys.readouterr().out
  assert "target 22,855,952 parameters" in out and "budget" in out


@pytest.mark.parametrize("budget", [None, "params"])
def test_every_sweep_row_matches_the_built_module(budget):
  rows = model_info.sweep_segments("xception", 299, budget=budget)
  segments = [row["segments"] for row in rows]
  if budget is None:
    assert segments == [1, 2, 4, 8, "depthwise"]  # 728 = 2^3 * 7 * 13, 64 = 2^6
  else:
    assert segments == list(model_info.BUDGET_SWEEP_CANDIDATES)
  for row in rows:
    params, batch_stats = _counted("xception", segments=row["segments"], widths=row["widths"])
    assert (row["params"], row["batch_stat_entries"]) == (params, batch_stats), row
    if budget is not None:
      assert abs(row["ratio"] - 1) <= 0.01
  assert rows[-1]["params"] == 22_855_952


def test_sweep_table_and_csv(tmp_path, capsys):
  path = tmp_path / "sweep.csv"
  assert (
    model_info.main(
      [
        "--model=xception_small",
        "--sweep_segments",
        "--budget=params",
        "--image_size=80",
        f"--csv={path}",
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(model_info.BUDGET_SWEEP_CANDIDATES)
  assert f"wrote {len(rows)} rows" in out
  for row in rows:
    assert f"{int(row['params']):,}" in out
    stages = sum(int(row[f"macs_{s}"]) for s in ("stem", "entry", "middle", "exit", "head"))
    assert stages == int(row["macs_total"])
    assert abs(float(row["ratio"]) - 1) <= 0.01


def test_invalid_settings_are_reported(capsys):
  assert model_info.main(["--segments=16"]) == 2
  err = capsys.readouterr().err
  assert "728 channels" in err and "block4_sepconv2" in err
  assert model_info.main(["--csv=/tmp/x.csv"]) == 2
  assert "--sweep_segments" in capsys.readouterr().err
  assert model_info.main(["--image_size=64"]) == 2
  assert ">= 71" in capsys.readouterr().err


def test_parsers():
  assert models.parse_segments("4") == 4
  assert models.parse_segments("depthwise") == "depthwise"
  assert models.parse_segments("entry=4,middle=depthwise") == {"entry": 4, "middle": "depthwise"}
  assert model_info.parse_image_size("320x240") == (320, 240)
  assert model_info.parse_budget("22,855,952") == 22_855_952
  with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
    model_info.parse_image_size("big")


def test_models_without_formulas_are_counted(capsys):
  """Other models (Inception V3) get eval_shape counts and XLA's multiply-adds."""
  assert model_info.main(["--model=inception_v3_tiny", "--image_size=80"]) == 0
  out = capsys.readouterr().out
  params, batch_stats = _counted("inception_v3_tiny", 80)
  assert f"{params:,}" in out and f"{batch_stats:,}" in out and "XLA cost analysis" in out
  counted = costs.counted_cost("xception_tiny", 80, num_classes=10)
  analytic = costs.model_cost("xception_tiny", 80, num_classes=10, exclude_padding=True)
  assert counted.params == analytic.params
  assert 1.0 <= counted.macs_total / analytic.macs_total < 1.1
