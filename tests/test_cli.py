"""One command-line convention: absl flags with underscores, and the hyphenated spellings that
README.md documented before still parse to the same values (users' scripts keep working)."""

import importlib.util
import os
import sys

from absl import flags
import pytest

from xception_jax import cli
from xception_jax import export
from xception_jax import predict
from xception_jax.tools import benchmark
from xception_jax.tools import model_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep_module():
  spec = importlib.util.spec_from_file_location(
    "launch_sweep_cli", os.path.join(REPO, "launch", "sweep.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses need it
  spec.loader.exec_module(module)
  return module


def test_hyphens_are_rewritten_for_defined_flags_only():
  values = flags.FlagValues()
  flags.DEFINE_string("raw_name", None, "", flag_values=values)
  flags.DEFINE_bool("residual", True, "", flag_values=values)
  argv = [
    "--raw-name",
    "--not-a-value",
    "--residual",
    "--no-residual",
    "--no_residual",
    "-raw-name=a-b",
    "--unknown-flag=1",
    "photo-1.jpg",
    "--",
    "--raw-name=x",
  ]
  assert cli.accept_hyphens(argv, values) == [
    "--raw_name",
    "--not-a-value",
    "--residual",
    "--noresidual",
    "--noresidual",
    "-raw_name=a-b",
    "--unknown-flag=1",
    "photo-1.jpg",
    "--",
    "--raw-name=x",
  ]


@pytest.mark.parametrize(
  "tool, old, new",
  [
    (
      "export",
      ["--workdir=w", "--out=o", "--raw-weights", "--saved-model=no"],
      ["--workdir=w", "--out=o", "--raw_weights", "--saved_model=no"],
    ),
    (
      "export",
      ["--from=keras:xception", "--out=o", "--image-size=224"],
      ["--from=keras:xception", "--out=o", "--image_size=224"],
    ),
    (
      "predict",
      ["--model=m", "--top-k=3", "--batch-size=2", "a.jpg"],
      ["--model=m", "--top_k=3", "--batch_size=2", "a.jpg"],
    ),
    (
      "model_info",
      [
        "--sweep-segments",
        "--sweep-candidates=1,2",
        "--group-width=8",
        "--width-multiplier=0.5",
        "--num-middle-blocks=2",
        "--num-classes=10",
        "--fc-layers=64",
        "--no-residual",
        "--exclude-padding",
        "--image-size=80",
      ],
      [
        "--sweep_segments",
        "--sweep_candidates=1,2",
        "--group_width=8",
        "--width_multiplier=0.5",
        "--num_middle_blocks=2",
        "--num_classes=10",
        "--fc_layers=64",
        "--noresidual",
        "--exclude_padding",
        "--image_size=80",
      ],
    ),
    (
      "benchmark",
      [
        "--image-size=128",
        "--num-classes=10",
        "--peak-tflops=2",
        "--conv-formulation=native",
        "--profile-dir=/tmp/p",
      ],
      [
        "--image_size=128",
        "--num_classes=10",
        "--peak_tflops=2",
        "--conv_formulation=native",
        "--profile_dir=/tmp/p",
      ],
    ),
    (
      "sweep",
      [
        "--config=configs/spectrum.py",
        "--segments=1",
        "--workdir-root=/r",
        "--dry-run",
        "--mid-activation=relu",
        "--first-seed=2",
        "--launcher=slurm",
        "--launcher-args=--nodes=2 --gpus-per-node=4",
        "--config.total_steps=3",
      ],
      [
        "--config=configs/spectrum.py",
        "--segments=1",
        "--workdir_root=/r",
        "--dry_run",
        "--mid_activation=relu",
        "--first_seed=2",
        "--launcher=slurm",
        "--launcher_args=--nodes=2 --gpus-per-node=4",
        "--config.total_steps=3",
      ],
    ),
  ],
)
def test_old_hyphenated_spellings_still_work(tool, old, new):
  module = {
    "export": export,
    "predict": predict,
    "model_info": model_info,
    "benchmark": benchmark,
  }.get(tool) or _sweep_module()

  def parse(argv):
    if tool == "model_info":
      return cli.parse(module.FLAGS, argv, "model_info")
    return module.parse_args(argv)

  results = []
  for argv in (old, new):
    returned = parse(argv)
    results.append((module.FLAGS.flag_values_dict(), returned))
  assert results[0] == results[1]
  for arg in new:  # every flag given took effect (none was dropped as a value or an unknown)
    name = arg[2:].partition("=")[0]
    if not arg.startswith("--") or arg.startswith("--config."):
      continue
    name = name[2:] if name not in module.FLAGS else name  # --noresidual
    assert module.FLAGS[name].value != module.FLAGS[name].default, arg
