"""Test set-up: 8 fake CPU devices and, for the CPU suite, fast-compiling XLA flags
(tests/xla_flags.py; both before JAX starts), quiet TensorFlow logs, one on-disk JAX compilation
cache for the session, and the host-memory settings of CPU runs (`xception_jax/host_memory.py`,
before JAX starts).

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

import xla_flags

_CALLER_SET_XLA_FLAGS = "XLA_FLAGS" in os.environ
os.environ.setdefault("XLA_FLAGS", f"{xla_flags.DEVICE_COUNT}=8")
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
    if not _CALLER_SET_XLA_FLAGS:
      os.environ["XLA_FLAGS"] = xla_flags.CPU_TEST_FLAGS
    # As the training command does on a CPU: step buffers reused, not faulted in again.
    from xception_jax import host_memory  # pylint: disable=g-import-not-at-top

    host_memory.keep_freed_host_memory()


# The modules whose tests each train or start processes (40-90 s apiece on 2 cores): run first, so
# that the workers of `-n 2` (pyproject.toml: --dist=worksteal) share them out and then fill up
# with the many short tests, instead of one worker running test_train.py alone at the end.
_LONG_MODULES = ("test_launch.py", "test_train.py", "test_configs.py", "test_export.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONG_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within
