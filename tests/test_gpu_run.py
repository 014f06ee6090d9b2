"""The GPU session's tooling, checked without a GPU: report, points driver, script, conftest.

`bench/gpu_run.sh` itself is rehearsed end to end with `--smoke` (BENCHMARKS.md, section 5); here
only what is cheap: the report's ratios, verdicts and profile choices on made-up records (the
numbers below are inputs, not measurements), the --segments shorthand, the script's argument
check, and how tests/conftest.py decides to leave the accelerator to the gpu tests.
"""
import importlib.util
import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, folder="bench"):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, folder, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


gpu_report = _load("gpu_report")
run_points = _load("run_points")
root_conftest = _load("conftest", "tests")  # by path: tests/gpu has a conftest module too


def _timm(model, mode, impl, images_per_sec, **extra):
  return {"source": "compare_timm", "model": model, "mode": mode, "impl": impl,
          "images_per_sec": images_per_sec, "step_time_ms": 128e3 / images_per_sec,
          "compile_s": 30.0, "peak_memory_bytes_device": 2**34, "mfu": 0.3, **extra}


def _point(tag, g, ms, form="auto"):
  return {"source": "run_points", "tag": tag, "segments": g, "conv_formulation": form,
          "point": f"--segments={g}" + ("" if form == "auto" else f" --conv-formulation={form}"),
          "common": "--model=xception --budget=params", "step_time_ms": ms,
          "images_per_sec": 128e3 / ms, "num_params": 22_900_000,
          "hlo_ops": {"convolution": 10, "dot_general": 2}}


RECORDS = [
    {"stage": "env", "what": "nvidia-smi", "value": "NVIDIA H100 80GB HBM3, 580.1"},
    {"stage": "gpu-tests", "plan": "first", "status": "ok", "rc": 0, "seconds": 130, "limit_s": 240},
    _timm("xception", "train", "ours", 300.0, profile_dir="/tmp/prof_train"),
    _timm("xception", "train", "timm eager", 200.0),
    _timm("xception", "train", "timm compile", 260.0),
    _timm("xception", "infer", "ours", 900.0, profile_dir="/tmp/prof_infer"),
    _timm("xception", "infer", "timm eager", 800.0),
    {"source": "compare_timm", "model": "xception", "mode": "infer", "impl": "timm compile",
     "error": "exit 1: boom"},
    _point("spectrum-auto", 1, 100.0), _point("spectrum-auto", "depthwise", 120.0),
    _point("spectrum-auto", 64, 200.0), _point("spectrum-rewritten", 64, 150.0, "grouped=rewritten"),
    '{"stage": "cut off mid-wri',
]


def test_report_ratios_verdicts_and_profile_choices(tmp_path):
  path = tmp_path / "results.jsonl"
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in RECORDS) + "\n")
  records = gpu_report.load(str(path))
  assert len(records) == len(RECORDS) - 1  # the cut-off line is skipped
  verdicts = {(t["model"], t["mode"]): t for t in gpu_report.targets(records)}
  train, infer = verdicts[("xception", "train")], verdicts[("xception", "infer")]
  assert train["best"] == "timm compile" and train["ratio"] == pytest.approx(300 / 260)
  assert not train["met"]  # 1.15x < 1.25x
  assert infer["met"] and infer["best"] == "timm eager"  # the failed compile run is left out
  ratios = gpu_report.spectrum_ratios(records)
  assert ratios["64"] == pytest.approx(200 / 120) and ratios["1"] == pytest.approx(100 / 120)
  assert gpu_report.profile_traces(records) == ["/tmp/prof_train"]
  assert gpu_report.profile_rerun(records) == "--model=xception --budget=params --segments=64"
  text = gpu_report.report(records)
  assert "MISSED by 8%" in text and "worst G = 64 at 1.67x" in text
  assert "| 64 | 22,900,000 | 200.0 | 640.0 | 1.67x | grouped=rewritten | 150.0 |" in text
  assert "failed: exit 1: boom" in text and "NVIDIA H100" in text


def test_points_shorthand():
  assert run_points.expand(["--segments=4 --steps=2"], ["1", "64:grouped=rewritten"]) == [
      "--segments=4 --steps=2", "--segments=1",
      "--segments=64 --conv-formulation=grouped=rewritten"]


def test_gpu_run_script_needs_a_plan():
  script = os.path.join(REPO, "bench", "gpu_run.sh")
  assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
  for args in ([], ["second"]):
    proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "PLAN" in proc.stderr, args


@pytest.mark.parametrize("markexpr, gpu", [("not slow and not gpu", False), ("gpu", True),
                                           ("gpu and not slow", True), ("(gpu)", True),
                                           ("slow", False), ("", False)])
def test_only_a_gpu_marker_expression_leaves_the_platform_to_jax(markexpr, gpu):
  assert root_conftest._selects_gpu_tests(markexpr) == gpu
