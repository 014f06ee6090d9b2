"""The library versions a result was made with, recorded beside it so it can be reproduced.

Exports (export.json's `versions`) and benchmark results carry them: a number or a file means
little without the jax/XLA that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
from importlib import metadata
import platform

EXPORT_LIBRARIES = ("python", "jax", "jaxlib", "flax", "numpy", "xception_jax")


def library_versions(names: Sequence[str] = EXPORT_LIBRARIES) -> dict[str, str]:
  """{name: version} in the order given: 'python', 'xception_jax' (installed version, or
  'source checkout' when run from a clone) or any importable module with a `__version__`."""
  versions = {}
  for name in names:
    if name == "python":
      versions[name] = platform.python_version()
    elif name == "xception_jax":
      try:
        versions[name] = metadata.version("xception_jax")
      except metadata.PackageNotFoundError:
        versions[name] = "source checkout"
    else:
      versions[name] = importlib.import_module(name).__version__
  return versions
