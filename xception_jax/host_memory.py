"""Keeps freed host memory in the process on CPU-only runs (three glibc malloc settings).

XLA:CPU allocates each step's buffers afresh and frees them after the step: for Xception at
71x71, batch 32, a 607 MB temporary buffer and two of 90 and 40 MB. glibc serves allocations
that large, made from XLA's threads, with fresh pages from mmap and unmaps them on free, so every
step faults the whole 0.7 GB in again: 170,000 page faults and about 0.5 s of kernel time per
1.3-1.5 s step on the 2-core machine (BENCHMARKS.md section 7). With one malloc arena, no mmap for
large blocks and no trimming of the heap, the freed buffers stay in the heap and the next step
reuses them: no faults after the first steps. The cost is that the process keeps its peak host
memory until it exits, which is what a training or benchmark process needs anyway.

Applied only where it helps and cannot hurt: Linux with glibc, JAX running on the CPU (no GPU
or TPU plugin installed, or JAX_PLATFORMS=cpu; a GPU host's input pipeline threads would contend
for the single arena), and not when GLIBC_TUNABLES already sets a glibc.malloc tunable (the
user's choice wins, and is how to turn this off: e.g. GLIBC_TUNABLES=glibc.malloc.arena_max=8).
Must run before JAX creates its CPU client, whose threads pick their malloc arena on their first
allocation; `main` and `tools/benchmark` call it first thing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _runs_on_cpu_only() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS=cpu, or no accelerator plugin installed
  (decided without starting any JAX backend)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  (JAX's plugin namespace)
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def keep_freed_host_memory() -> bool:
  """Sets the malloc settings above when they apply (see the module docstring); returns whether
  they were set. Safe to call more than once."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or not _runs_on_cpu_only():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
