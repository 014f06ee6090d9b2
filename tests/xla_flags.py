"""The XLA flags the CPU test suite runs with (tests/conftest.py sets them unless XLA_FLAGS is set).

- 8 fake CPU devices, so that sharding and multi-device code runs on any machine.
- LLVM at optimisation level 0: the suite's time is mostly XLA compiling tiny models, once each
  (xception_tiny's training step on a 2-core AMD EPYC: 15 s -> 9 s; tests/test_train.py 184 s ->
  142 s), and level 0 changes how fast the code runs, not what it computes. Training, benchmarks
  and the GPU tests keep XLA's default.

Subprocess tests that choose their own device count keep the other flags through
`without_device_count`.
"""

from __future__ import annotations

DEVICE_COUNT = "--xla_force_host_platform_device_count"
CPU_TEST_FLAGS = f"{DEVICE_COUNT}=8 --xla_backend_optimization_level=0"


def without_device_count(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) without its fake-device count: for a process that sets its own."""
  return " ".join(f for f in flags.split() if not f.startswith(DEVICE_COUNT + "="))
