"""The per-platform formulation table of `layers.conv_general_dilated` and its override.

`layers.CONV_FORMULATIONS` says, per kind of convolution (depthwise, grouped, pointwise 1x1,
regular kh x kw),
which platforms run the rewritten form; `layers.conv_formulation` forces a form on every platform
so the two can be timed against each other on a GPU (`tools/benchmark.py --conv_formulation`).
Checked here on the CPU: the forced forms compute what the native op computes (values and
gradients, fp32 and bf16) when called without `lax.platform_dependent`; a program lowered for
CUDA holds the native convolutions by default, and matrix products where the override or the
table says so, while other platforms keep theirs; the benchmark flag is validated, recorded and
takes effect.
"""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest
from test_cpu_formulations import _assert_close
from test_cpu_formulations import _lowered_ops
from test_cpu_formulations import _native_conv
from test_cpu_formulations import _normal
from test_cpu_formulations import _ours_conv
from test_cpu_formulations import _value_and_grads

from xception_jax.models import layers
from xception_jax.tools import benchmark
from xception_jax.tools import measurements

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
  "profile_summary", os.path.join(REPO, "bench", "profile_summary.py")
)
profile_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_summary)

# One convolution of each kind: (kind, input shape, kernel shape, strides, feature groups).
KINDS = [
  ("depthwise", (2, 7, 7, 8), (3, 3, 1, 8), (1, 1), 8),
  ("grouped", (1, 6, 5, 80), (3, 3, 4, 80), (2, 2), 20),  # narrow groups: merged, strided
  ("pointwise", (2, 8, 6, 8), (1, 1, 8, 12), (2, 2), 1),
  ("regular", (2, 7, 6, 8), (3, 3, 8, 12), (1, 1), 1),
]


def test_parse_conv_formulation():
  assert layers.parse_conv_formulation("auto") == {}
  assert layers.parse_conv_formulation("rewritten") == dict.fromkeys(layers.CONV_KINDS, "rewritten")
  assert layers.parse_conv_formulation(" grouped=rewritten, depthwise=auto,pointwise=native") == {
    "grouped": "rewritten",
    "pointwise": "native",
  }
  for bad in ("fast", "grouped", "grouped=fast", "dense=native", ""):
    with pytest.raises(ValueError, match="KIND=FORM"):
      layers.parse_conv_formulation(bad)


def test_table_names_every_kind_and_keeps_cuda_native_until_measured():
  assert set(layers.CONV_FORMULATIONS) == set(layers.CONV_KINDS)
  for kind, forms in layers.CONV_FORMULATIONS.items():
    assert set(forms.values()) <= set(layers.CONV_FORMS), kind
    assert forms["cpu"] == "rewritten" and forms["cuda"] == "native", kind


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind,x_shape,w_shape,strides,groups", KINDS, ids=[k[0] for k in KINDS])
def test_forced_rewrite_matches_native(kind, x_shape, w_shape, strides, groups, dtype):
  """Forced, the rewrite is called directly (no platform_dependent), as it would be on a GPU."""
  x, w = _normal(0, x_shape, dtype), _normal(1, w_shape, dtype)
  native = functools.partial(_native_conv, strides=strides, padding="SAME", groups=groups)
  ours = functools.partial(_ours_conv, strides=strides, padding="SAME", groups=groups)
  cotangent = _normal(2, jax.eval_shape(native, x, w).shape)
  with layers.conv_formulation(f"{kind}=rewritten"):
    kernel_grad = jax.grad(lambda x, w: jnp.sum(ours(x, w).astype(jnp.float32)), argnums=1)
    assert "convolution" not in _lowered_ops(kernel_grad, "cuda", x, w)
    if kind != "regular":  # whose rewrite keeps XLA's forward pass and input gradient
      assert "convolution" not in _lowered_ops(ours, "cuda", x, w)
    forced = _value_and_grads(ours, x, w, cotangent)
  _assert_close(forced, _value_and_grads(native, x, w, cotangent), dtype)


def test_cuda_lowering_follows_the_table_and_the_override(monkeypatch):
  x8, x80 = _normal(0, (1, 6, 6, 8)), _normal(0, (1, 6, 6, 80))
  w_dw, w_g, w_1 = _normal(1, (3, 3, 1, 8)), _normal(1, (3, 3, 4, 80)), _normal(1, (1, 1, 8, 8))
  depthwise = lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 8)
  grouped = lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 20)
  pointwise = lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 1)
  cases = {
    "depthwise": (depthwise, x8, w_dw),
    "grouped": (grouped, x80, w_g),
    "pointwise": (pointwise, x8, w_1),
  }

  def lowered(kind, platform):
    fn, x, w = cases[kind]
    return _lowered_ops(
      jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)), platform, x, w
    )

  def convs(kind, platform):
    return lowered(kind, platform).count("convolution")

  for kind in cases:  # the table today: native on CUDA, rewritten on CPU
    assert convs(kind, "cuda") > 0 and convs(kind, "cpu") == 0, kind
  for kind in ("grouped", "pointwise"):  # the native program has no matrix product
    assert "dot_general" not in lowered(kind, "cuda"), kind
  with layers.conv_formulation("grouped=rewritten,depthwise=native"):
    assert convs("grouped", "cuda") == 0 and "dot_general" in lowered("grouped", "cuda")
    assert convs("depthwise", "cpu") > 0  # forced native on CPU too
    assert convs("pointwise", "cuda") > 0 and convs("pointwise", "cpu") == 0  # not forced: table
  assert convs("grouped", "cuda") > 0 and convs("depthwise", "cpu") == 0  # restored on exit
  # A table entry saying "rewritten" for CUDA rewrites there, and TPU keeps the native op.
  monkeypatch.setitem(
    layers.CONV_FORMULATIONS, "grouped", {"cpu": "rewritten", "cuda": "rewritten"}
  )
  assert convs("grouped", "cuda") == 0 and "dot_general" in lowered("grouped", "cuda")
  assert convs("grouped", "tpu") > 0


def test_benchmark_flag_is_validated_and_takes_effect(tmp_path, capsys, monkeypatch):
  with pytest.raises(ValueError, match="--conv_formulation"):
    benchmark.BenchmarkSettings(conv_formulation="grouped=fast").validate()
  settings, _ = benchmark.parse_args(
    ["--conv_formulation=grouped=rewritten", f"--profile_dir={tmp_path}"]
  )
  assert settings.conv_formulation == "grouped=rewritten" and settings.profile_dir == str(tmp_path)
  # The whole build-lower-compile-time runs inside the override (the real run is exercised by
  # tests/test_benchmark.py with the default, and on a model by `bench/gpu_run.sh --smoke`).
  monkeypatch.setattr(benchmark, "_run_benchmark", lambda s: dict(layers._forced_formulations))
  assert benchmark.run_benchmark(settings) == {"grouped": "rewritten"}
  assert layers._forced_formulations == {}
  # What the result reports: the ops of the lowered program, and a trace of extra steps that
  # bench/profile_summary.py summarises.
  x, w = _normal(0, (1, 6, 6, 8)), _normal(1, (3, 3, 1, 8))
  step = jax.jit(lambda x, w: _ours_conv(x, w, (1, 1), "SAME", 8))
  with layers.conv_formulation("native"):
    assert measurements.count_ops(step.lower(x, w)) == {"convolution": 1, "dot_general": 0}
  assert measurements.profile(lambda i: step(x, w), 0, str(tmp_path / "trace")) is None
  assert (
    profile_summary.main([str(tmp_path / "trace"), "--top=3", f"--json-out={tmp_path}/p.json"]) == 0
  )
  summary = json.loads((tmp_path / "p.json").read_text())
  assert summary["kind"] == "host" and summary["top"] and summary["top"][0]["total_ms"] > 0
  assert "| 1 |" in capsys.readouterr().out
