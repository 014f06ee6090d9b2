"""The XLA flags the CPU test suite runs with (tests/conftest.py sets them unless XLA_FLAGS is set).

- 8 fake CPU devices, so that sharding and multi-device code runs on any machine.
- LLVM at optimisation level 0: the suite's time is mostly XLA compiling tiny models, once each
  (xception_tiny's training step on a 2-core AMD EPYC: 15 s -> 9 s; tests/test_train.py 184 s ->
  142 s), and level 0 changes how fast the code runs, not what it computes. Training, benchmarks
  and the GPU tests keep XLA's default.

Subprocess tests that choose their own device count keep the other flags through
`environ_without_device_count`.
"""

from __future__ import annotations

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"
CPU_TEST_FLAGS = f"{DEVICE_COUNT}=8 --xla_backend_optimization_level=0"


def environ_without_device_count() -> dict[str, str]:
  """A copy of os.environ whose XLA_FLAGS lacks the fake-device count: for a subprocess that sets
  its own (or runs on one device) and keeps the other flags."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  kept = " ".join(f for f in flags if not f.startswith(DEVICE_COUNT + "="))
  return {**os.environ, "XLA_FLAGS": kept}
