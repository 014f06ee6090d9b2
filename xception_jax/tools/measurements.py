"""The benchmark's instruments: step timing, XLA's FLOP and memory counts, device peaks, traces.

Nothing here knows the model or the step: `tools/benchmark.py` decides what to run and these
measure it, so that a number in BENCHMARKS.md has one definition (how a step is timed, which
memory figure is reported, which peak an MFU is relative to) whatever produced it.
"""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import Any

import jax

PROFILE_STEPS = 5  # steps traced after the timed ones when --profile_dir is given


# Dense (no 2:4 sparsity) peak TFLOP/s per device, (bfloat16, float32 as run by XLA). Matched as a
# lower-case substring of jax.Device.device_kind, first match wins (so 'h100 pcie' precedes
# 'h100'). float32 on NVIDIA GPUs since Ampere runs convolutions and matmuls in TF32 under JAX's
# default precision, so its peak is the TF32 tensor-core rate; TPUs run float32 matmuls as bf16
# passes, so no float32 peak is claimed for them (mfu null).
# Sources (vendor datasheets; "sparse" figures halved to dense):
#   H100 SXM: NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 / TF32 989 TFLOPS with
#     sparsity -> 989.4 / 494.7 dense (also Hopper whitepaper table 3, 1.83 GHz boost).
#   H100 PCIe: same datasheet: BF16 1,513 / TF32 756 with sparsity -> 756 / 378 dense.
#   H200: NVIDIA H200 datasheet: same GH100 compute as H100 SXM (BF16 1,979 sparse).
#   A100: NVIDIA A100 datasheet: BF16 312, TF32 156 dense.
#   TPU v4 275, v5e ('TPU v5 lite') 197, v5p ('TPU v5') 459, v6e ('TPU v6 lite') 918 bf16 per chip:
#     Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e).
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
  ("h100 pcie", 756.0, 378.0),
  ("h100", 989.4, 494.7),
  ("h200", 989.4, 494.7),
  ("a100", 312.0, 156.0),
  ("tpu v4", 275.0, None),
  ("tpu v5 lite", 197.0, None),
  ("tpu v5e", 197.0, None),
  ("tpu v5p", 459.0, None),
  ("tpu v5", 459.0, None),
  ("tpu v6 lite", 918.0, None),
  ("tpu v6e", 918.0, None),
)


def peak_tflops_for(device_kind: str, dtype: str) -> float | None:
  """The dense peak TFLOP/s of one device of this kind at this dtype, or None if unknown."""
  kind = device_kind.lower()
  for key, bf16, fp32 in PEAK_TFLOPS:
    if key in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


def flops(cost_analysis: Any) -> float | None:
  """'flops' from a Lowered/Compiled cost analysis (a dict, or a one-element list in old JAX)."""
  if isinstance(cost_analysis, (list, tuple)):
    cost_analysis = cost_analysis[0] if cost_analysis else None
  if not cost_analysis or "flops" not in cost_analysis:
    return None
  return float(cost_analysis["flops"])


def compiled_memory_bytes(compiled) -> int | None:
  """XLA's static estimate of the step's device memory: arguments + outputs - aliased + temps."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if stats is None:
    return None
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


def device_peak_memory_bytes() -> int | None:
  """The largest peak_bytes_in_use over local devices, where the backend reports it."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def time_steps(run_one: Callable[[int], Any], steps: int, warmup: int) -> tuple[list[float], float]:
  """Wall seconds per step, each synchronised, after `warmup` untimed steps; and the process's
  CPU seconds per step over the timed steps (all threads; on a shared CPU it moves less with
  other people's load than wall time does)."""
  for i in range(warmup):
    jax.block_until_ready(run_one(i))
  times = []
  cpu_start = time.process_time()
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run_one(warmup + i))
    times.append(time.perf_counter() - start)
  return times, (time.process_time() - cpu_start) / steps


def count_ops(lowered) -> dict[str, int]:
  """Convolutions and dot_generals in the lowered (StableHLO) program."""
  text = lowered.as_text()
  return {op: text.count(f"stablehlo.{op}") for op in ("convolution", "dot_general")}


def profile(run_one: Callable[[int], Any], first: int, profile_dir: str) -> str | None:
  """Traces PROFILE_STEPS steps into profile_dir; the error as text if tracing failed."""
  try:
    jax.block_until_ready(run_one(first))  # nothing pending when the trace starts
    with jax.profiler.trace(profile_dir):
      for i in range(1, PROFILE_STEPS + 1):
        jax.block_until_ready(run_one(first + i))
  except Exception as e:  # pylint: disable=broad-except  (the measurement stands without it)
    return f"{type(e).__name__}: {e}"
  return None
