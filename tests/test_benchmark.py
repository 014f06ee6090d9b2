"""The benchmark tool: it runs the real step on tiny models, its FLOP accounting, peaks, flags.

No timing is asserted (CI machines are shared); only that measurements exist and are consistent.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from xception_jax.models import costs
from xception_jax.tools import benchmark
from xception_jax.tools import measurements

_NUMBERS = (
  "compile_s",
  "step_time_ms",
  "step_time_ms_min",
  "images_per_sec",
  "tflops",
  "flops_per_step",
  "process_cpu_ms_per_step",
)


@pytest.mark.parametrize(
  "kind, dtype, expected",
  [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v4", "float32", None),
    ("cpu", "bfloat16", None),
  ],
)
def test_peak_table(kind, dtype, expected):
  assert measurements.peak_tflops_for(kind, dtype) == expected


def test_train_step_of_xception_tiny_runs_and_counts_analytic_flops(capsys):
  # 8 fake CPU devices (conftest): batch 8 is split over the 'data' axis like a real run.
  benchmark.main(
    [
      "--model=xception_tiny",
      "--mode=train",
      "--batch=8",
      "--image_size=71",
      "--steps=2",
      "--warmup=0",
      "--segments=2",
      "--num_classes=10",
      "--json",
      "--peak_tflops=1.0",
    ]
  )
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in _NUMBERS:
    assert math.isfinite(result[key]) and result[key] > 0, key
  assert result["images_per_sec"] == pytest.approx(8 / (result["step_time_ms"] / 1e3))
  assert result["num_devices"] == 8 and result["platform"] == "cpu"
  assert result["segments"] == 2 and result["mode"] == "train"
  cost = costs.model_cost("xception_tiny", image_size=71, segments=2, num_classes=10)
  assert result["flops_source"] == "analytic"
  assert result["flops_per_step"] == pytest.approx(2 * cost.macs_total * 8 * 3)
  # XLA's count of the whole step lands near the 3 x forward convention (a check that neither
  # side is off by a pass): a little under it, because the images need no gradient, a little
  # over it for batch norm, the optimizer and the EMA.
  assert 0.8 < result["xla_flops_per_step"] / result["flops_per_step"] < 1.3
  # --peak_tflops is per device; MFU is against all 8.
  assert result["peak_tflops"] == 8.0
  assert result["mfu"] == pytest.approx(result["tflops"] / 8.0)
  assert result["peak_memory_bytes_compiled"] > 0


def test_inference_without_analytic_costs_uses_xla_forward_flops(monkeypatch):
  # Models outside the Xception family (Inception V3) have no analytic costs; emulate that with
  # xception_tiny (cheaper to compile) so XLA's count can be checked against the formulas too.
  monkeypatch.setattr(benchmark, "_analytic_forward_flops", lambda settings: None)
  result = benchmark.run_benchmark(
    benchmark.BenchmarkSettings(
      model="xception_tiny", mode="infer", batch=8, image_size=71, steps=1, warmup=0, num_classes=10
    )
  )
  assert result["flops_source"] == "xla_forward"
  assert result["flops_per_step"] == pytest.approx(result["xla_flops_per_step"])
  analytic = 2 * costs.model_cost("xception_tiny", image_size=71, num_classes=10).macs_total * 8
  assert 1.0 <= result["flops_per_step"] / analytic < 1.2  # + batch norm, pooling, activations
  assert result["mfu"] is None  # no known peak for CPUs
  text = benchmark.format_report(result)
  assert "images/s" in text and "MFU n/a" in text


def test_flags():
  settings, as_json = benchmark.parse_args(
    ["--image_size=128", "--segments=depthwise", "--budget=params", "--dtype=bfloat16"]
  )
  assert (settings.image_size, settings.segments, settings.budget, settings.dtype) == (
    128,
    "depthwise",
    "params",
    "bfloat16",
  )
  assert not as_json
  settings, as_json = benchmark.parse_args(["--image_size=99", "--segments=4", "--json"])
  assert (settings.image_size, settings.segments, as_json) == (99, 4, True)
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--segments=four"])


@pytest.mark.parametrize(
  "field, value",
  [("mode", "eval"), ("dtype", "float16"), ("batch", 0), ("budget", "flops"), ("warmup", -1)],
)
def test_bad_settings_are_rejected_before_building(field, value):
  settings = benchmark.BenchmarkSettings(**{field: value})
  with pytest.raises(ValueError, match=field.replace("_", "-")):
    settings.validate()


def test_benchmark_path_imports_no_tensorflow():
  # The GPU machine has no TensorFlow: importing the tool (model, step, optimizer, synthetic data)
  # must not pull it in. A fresh interpreter, because other tests may have imported it.
  code = (
    "import sys; from xception_jax.tools import benchmark; "
    "found = [m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules]; "
    "print(found); sys.exit(1 if found else 0)"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
