"""requirements.txt installs everywhere: one TensorFlow package per platform, chosen by markers.

The offline test evaluates the environment markers for each platform the project supports
(`packaging`, as pip does). The slow test resolves the file against the package index for each
platform with uv (needs the index and uv, so it is not in the default offline run):

    pip install uv && python -m pytest -q -m slow tests/test_requirements.py
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "requirements.txt")


def _environment(sys_platform, machine, python):
  return {"sys_platform": sys_platform, "platform_machine": machine, "platform_system": {
      "linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[sys_platform],
          "python_version": python, "python_full_version": python + ".0", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


PLATFORMS = {
    "linux-x86_64": ("linux", "x86_64", "tensorflow-cpu"),
    "linux-aarch64": ("linux", "aarch64", "tensorflow"),
    "macos-arm64": ("darwin", "arm64", "tensorflow"),
}


def _requirements():
  with open(REQUIREMENTS) as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  return [Requirement(line) for line in lines if line]


@pytest.mark.parametrize("python", ["3.11", "3.12"])
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_one_tensorflow_package_per_platform(platform, python):
  sys_platform, machine, expected = PLATFORMS[platform]
  env = _environment(sys_platform, machine, python)
  selected = {r.name for r in _requirements() if r.marker is None or r.marker.evaluate(env)}
  assert {n for n in selected if n.startswith("tensorflow") and n != "tensorflow-datasets"} == {
      expected}
  assert {"jax", "flax", "h5py", "tensorflow-datasets"} <= selected


@pytest.mark.slow
@pytest.mark.parametrize("python", ["3.11", "3.12"])
@pytest.mark.parametrize("platform", ["aarch64-apple-darwin", "aarch64-manylinux_2_28",
                                      "x86_64-manylinux_2_28"])
def test_requirements_resolve_from_the_index(platform, python):
  """The whole file resolves to wheels for the platform (needs the index and `uv` on PATH).

  `uv pip compile --python-platform` evaluates the markers for the target platform; pip's
  `--platform` does not (pip 23 and 26 evaluate them for the machine it runs on, so on Linux it
  asks for tensorflow-cpu for macOS too). `promise`, a pure-Python dependency of
  tensorflow-datasets, exists only as a source archive, hence `--no-binary promise`.
  """
  uv = shutil.which("uv")
  if uv is None:
    pytest.skip("uv is not on PATH (pip install uv)")
  result = subprocess.run(
      [uv, "pip", "compile", "--quiet", "--python-platform", platform, "--python-version",
       python, "--only-binary", ":all:", "--no-binary", "promise", REQUIREMENTS],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  pinned = {line.split("==")[0] for line in result.stdout.splitlines() if "==" in line}
  expected = "tensorflow-cpu" if platform.startswith("x86_64") else "tensorflow"
  assert {"jax", "jaxlib", "h5py", expected} <= pinned
