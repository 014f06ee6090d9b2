"""Set-up of the GPU tests: the accelerator, the CPU beside it as the reference, and the sizes.

On a machine with an NVIDIA GPU and jax's CUDA plugin:

  python -m pytest -q -m gpu tests/gpu

(tests/conftest.py leaves JAX_PLATFORMS unset when the marker expression selects `gpu`, so the
GPU is JAX's default backend and `jax.devices("cpu")` is there beside it.) The tests need neither
TensorFlow nor the embedded datasets: weights, batch statistics and images are random.

Without a GPU every test here is skipped, and the default suite deselects them (pyproject.toml).
`XJ_GPU_TEST_BACKEND=cpu python -m pytest -q -m gpu tests/gpu` runs the same logic with the CPU
as the "accelerator" at toy sizes (tiny models, small images, small batches): the comparisons are
then CPU against CPU, so this checks the tests, not the GPU; `bench/gpu_run.sh --smoke` does it.

`XJ_GPU_TEST_RECORD=FILE` appends what the tests measured (parity errors, losses, how far a
resumed run is from an uninterrupted one) to FILE as JSON lines, for BENCHMARKS.md and README.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import pytest

# tests/ holds the helpers shared with the CPU suite (test_export.random_variables, ...).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKEND_ENV = "XJ_GPU_TEST_BACKEND"
RECORD_ENV = "XJ_GPU_TEST_RECORD"


@dataclasses.dataclass(frozen=True)
class Setup:
  """Where and how large: the real sizes on a GPU, toy ones for the CPU run of the logic."""
  device: Any  # the accelerator under test (jax.Device)
  reference: Any  # the CPU device the accelerator is compared with
  parity_models: tuple[tuple[str, int, dict[str, Any]], ...]  # (model, image size, settings)
  parity_batch: int
  train_model: str
  train_image_size: int
  train_batch: int
  train_steps: int
  resume_steps: int  # steps before and after the checkpoint
  export_model: tuple[str, int]


def _accelerator() -> Any:
  if os.environ.get(BACKEND_ENV, "gpu") == "cpu":
    return jax.devices("cpu")[0]
  try:
    return jax.devices("gpu")[0]
  except RuntimeError:
    pytest.skip(f"no GPU visible to jax (backends: {jax.default_backend()}); tests/gpu needs one "
                f"({BACKEND_ENV}=cpu runs their logic on the CPU at toy sizes)")


@pytest.fixture(scope="session")
def setup() -> Setup:
  device = _accelerator()
  if device.platform != "cpu":
    return Setup(device=device, reference=jax.devices("cpu")[0],
                 parity_models=(("xception", 299, {}), ("xception", 299, {"segments": 4}),
                                ("inception_v3", 299, {})),
                 parity_batch=4, train_model="xception", train_image_size=299, train_batch=64,
                 train_steps=30, resume_steps=10, export_model=("xception", 299))
  return Setup(device=device, reference=jax.devices("cpu")[0],
               parity_models=(("xception_tiny", 71, {}), ("xception_tiny", 71, {"segments": 4}),
                              ("inception_v3_tiny", 75, {})),
               parity_batch=2, train_model="xception_tiny", train_image_size=71, train_batch=8,
               train_steps=30, resume_steps=10, export_model=("xception_tiny", 71))


@pytest.fixture(scope="session")
def record():
  """record(test=..., **values): one JSON line in $XJ_GPU_TEST_RECORD (if set), and a print."""
  path = os.environ.get(RECORD_ENV)

  def write(**values):
    line = json.dumps({"stage": "gpu-tests", **values}, default=float)
    print(line)
    if path:
      with open(path, "a") as f:
        f.write(line + "\n")

  return write
