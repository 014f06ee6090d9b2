"""Test set-up: 8 fake CPU devices (before jax is imported) and quiet TensorFlow logs.

JAX runs on the CPU (JAX_PLATFORMS=cpu unless set), except when the marker expression selects
the `gpu` tests (`python -m pytest -q -m gpu tests/gpu`): those need the machine's accelerator,
so JAX is left to find it (tests/gpu/conftest.py).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _selects_gpu_tests(markexpr: str) -> bool:
  tokens = markexpr.replace("(", " ").replace(")", " ").split()
  return any(t == "gpu" and (i == 0 or tokens[i - 1] != "not") for i, t in enumerate(tokens))


def pytest_configure(config):
  # Runs before collection, so before any test module imports jax.
  if not _selects_gpu_tests(config.getoption("markexpr") or ""):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
