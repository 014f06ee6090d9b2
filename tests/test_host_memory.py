"""host_memory: freed step buffers stay in the process on CPU-only runs, and only there.

XLA:CPU frees and reallocates each step's large buffers from its own threads; with glibc's
defaults every reallocation faults its pages in again (BENCHMARKS.md section 7). Checked here in
fresh processes (malloc settings are per process and must precede the allocations): a 400 MB
block freed and allocated again from a worker thread faults again by default and not after
`keep_freed_host_memory()`; and the settings are skipped where they do not belong.
"""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from xception_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REALLOCATE = textwrap.dedent(
  """
  import ctypes, resource, sys, threading
  from xception_jax import host_memory
  kept = host_memory.keep_freed_host_memory() if sys.argv[1] == "keep" else False
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  faults = []
  def step():  # as XLA does (numpy would ask for huge pages, which hides the faults)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    size = 400 << 20
    buffer = libc.malloc(size)
    ctypes.memset(buffer, 1, size)  # written: every page touched
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  for _ in range(3):
    worker = threading.Thread(target=step)  # XLA allocates from its own threads too
    worker.start()
    worker.join()
  print(kept, faults[-1])
  """
)


def _refaults(mode: str, **env: str) -> tuple[str, int]:
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAX_PLATFORMS")}
  out = subprocess.run(
    [sys.executable, "-c", REALLOCATE, mode],
    env={**environ, "PYTHONPATH": REPO, **env},
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(
  not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  kept, faults = _refaults("keep", JAX_PLATFORMS="cpu")
  assert kept == "True" and faults < 1000, faults
  kept, faults = _refaults("default", JAX_PLATFORMS="cpu")
  assert kept == "False" and faults > 90_000, faults  # 400 MiB / 4 KiB pages = 102,400
  # The user's own malloc tunables win; a GPU run keeps glibc's defaults.
  assert _refaults("keep", JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.arena_max=4")[0] == (
    "False"
  )
  assert _refaults("keep", JAX_PLATFORMS="cuda")[0] == "False"


def test_platform_detection(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory._runs_on_cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory._runs_on_cpu_only()
  monkeypatch.delenv("JAX_PLATFORMS")
  # This test environment has no GPU or TPU plugin installed.
  assert host_memory._runs_on_cpu_only()
