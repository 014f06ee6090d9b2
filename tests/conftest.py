"""Test set-up: 8 fake CPU devices (before jax is imported), quiet TensorFlow logs, one
on-disk JAX compilation cache for the session, and the host-memory settings of CPU runs
(`xception_jax/host_memory.py`, before JAX starts).

JAX runs on the CPU (JAX_PLATFORMS=cpu unless set), except when the marker expression selects
the `gpu` tests (`python -m pytest -q -m gpu tests/gpu`): those need the machine's accelerator,
so JAX is left to find it (tests/gpu/conftest.py).

The compilation cache: many tests compile the same tiny training and eval steps again (every
`train_and_evaluate` call jits afresh, and the subprocess tests start new processes), and
compiling, not running, is most of the suite's time on a 2-core machine. A cache in a fresh
temporary folder, set through the environment so that subprocesses share it, compiles each
program once per session (test_resume_after_sigterm_is_exact: 75 s -> 46 s). A folder the caller
set in JAX_COMPILATION_CACHE_DIR is used as it is.
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _selects_gpu_tests(markexpr: str) -> bool:
  tokens = markexpr.replace("(", " ").replace(")", " ").split()
  return any(t == "gpu" and (i == 0 or tokens[i - 1] != "not") for i, t in enumerate(tokens))


def pytest_configure(config):
  # Runs before collection, so before any test module imports jax.
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.mkdtemp(prefix="xception_jax_test_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  if not _selects_gpu_tests(config.getoption("markexpr") or ""):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # As the training command does on a CPU: step buffers reused, not faulted in again.
    from xception_jax import host_memory  # pylint: disable=g-import-not-at-top

    host_memory.keep_freed_host_memory()
