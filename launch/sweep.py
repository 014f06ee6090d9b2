"""Grid sweeps over the spectrum: every combination of settings x seeds, one workdir per run.

  python launch/sweep.py --config=configs/spectrum.py --segments=1,4,16,depthwise --seeds=3 \
      --budget=params,none --workdir-root=/runs/spectrum
  python launch/sweep.py --config=configs/spectrum.py --segments=1,depthwise --seeds=2 \
      --runlocal --workdir-root=/tmp/sweep --dry-run
  python launch/sweep.py ... --launcher=slurm --launcher-args="--nodes=1 --gpus-per-node=8"

Each run gets a stable id derived from its settings, e.g. `segments-4_budget-params_seed-0_1a2b3c4d`
(the hash covers the config file, its argument string and every --config.* override, so a run
with other overrides never reuses a workdir). Rerunning the same command therefore finds the same
workdirs: finished runs are skipped, unfinished ones resume from their last checkpoint (the main
job restores by itself), new ones start. A run is finished when its newest checkpoint step equals
the total_steps recorded in its run.json.

Runs go one after another on this machine (--launcher=local), one after another on a Cloud TPU VM
(--launcher=tpu: launch/tpu_vm.sh, code synced and installed for the first run only), or are
submitted as one SLURM job each (--launcher=slurm: launch/slurm.sh; the jobs run in parallel).
The skip/resume decision reads the workdirs from here, so for cluster launchers the workdir root
should be on a file system this machine sees too (otherwise every run is started, and finished
ones end at once after restoring their last checkpoint).

Spectrum axes (--segments, --order, --mid-activation, --residual, --budget) take comma-separated
lists and become the config's argument string (configs/spectrum.py:segments=4,budget=params);
only the axes given are set, the others keep the config's defaults. Seeds go in as --config.seed.
Any further `--config.KEY=VALUE` is passed to every run unchanged. Reports:
`python -m xception_jax.tools.report --root=WORKDIR_ROOT`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
from xception_jax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position
from xception_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

LAUNCHERS = ("local", "tpu", "slurm")
CLUSTER_SCRIPTS = {"tpu": os.path.join("launch", "tpu_vm.sh"),
                   "slurm": os.path.join("launch", "slurm.sh")}

# Sweep flag -> (config argument name, valid values or None for "checked separately").
AXES = {
    "segments": ("segments", None),
    "order": ("order", ("depthwise_first", "pointwise_first")),
    "mid_activation": ("mid_activation", ("none", "relu", "elu")),
    "residual": ("residual", ("true", "false")),
    "budget": ("budget", ("params", "none")),
}
# Short names in run ids.
_ID_NAMES = {"segments": "segments", "order": "order", "mid_activation": "mid", "residual": "residual",
             "budget": "budget"}


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: config argument settings and a seed."""
  run_id: str
  workdir: str
  config: str  # config file path, with the full argument string after ':'
  settings: tuple[tuple[str, str], ...]  # (axis, value) in AXES order, the axes swept only
  seed: int
  overrides: tuple[str, ...]  # --config.KEY=VALUE passed unchanged

  def main_args(self) -> list[str]:
    """The arguments of `python -m xception_jax.main` for this run."""
    return [f"--config={self.config}", f"--workdir={self.workdir}", *self.overrides,
            f"--config.seed={self.seed}"]


@dataclasses.dataclass(frozen=True)
class RunStatus:
  state: str  # "new" | "unfinished" | "finished"
  step: int | None  # newest checkpoint step, if any
  total_steps: int | None  # from run.json, if written

  def describe(self) -> str:
    if self.state == "new":
      return "new"
    if self.state == "finished":
      return f"finished at step {self.step}: skipped"
    if self.step is None:
      return "started, no checkpoint yet: restarts"
    return f"unfinished: resumes from step {self.step} of {self.total_steps or '?'}"


def run_status(workdir: str) -> RunStatus:
  """Whether a run's workdir is absent, holds an unfinished run, or a finished one.

  Local or gs://; only finished checkpoints count (workdir.checkpoint_steps).
  """
  steps = workdir_lib.checkpoint_steps(workdir)
  step = max(steps) if steps else None
  total = None
  try:
    total = int(paths.read_json(os.path.join(workdir, "run.json"))["total_steps"])
  except (FileNotFoundError, KeyError, ValueError, TypeError):
    pass
  if not paths.Path(workdir).is_dir():
    return RunStatus("new", None, None)
  if step is not None and total is not None and step >= total:
    return RunStatus("finished", step, total)
  return RunStatus("unfinished", step, total)


def _split_list(flag: str, value: str) -> list[str]:
  items = [item.strip() for item in value.split(",") if item.strip()]
  if not items:
    raise ValueError(f"--{flag.replace('_', '-')}={value!r}: give at least one value.")
  if len(set(items)) != len(items):
    raise ValueError(f"--{flag.replace('_', '-')}={value!r} lists a value twice.")
  return items


def _check_values(axis: str, values: list[str]) -> list[str]:
  flag = f"--{axis.replace('_', '-')}"
  if axis == "segments":
    out = []
    for value in values:
      if value.lower() == "depthwise":
        out.append("depthwise")
      elif value.isdigit() and int(value) >= 1:
        out.append(str(int(value)))
      else:
        raise ValueError(f"{flag}: {value!r} is not a segment count; valid: positive integers "
                         "(1 = regular convolution) or 'depthwise'.")
    return out
  valid = AXES[axis][1]
  values = [v.lower() for v in values]
  for value in values:
    if value not in valid:
      raise ValueError(f"{flag}: {value!r} is not valid; valid: {', '.join(valid)}.")
  return values


def _config_path_for_id(config_file: str) -> str:
  """The config file as the hash sees it: relative to the repository when inside it."""
  path = os.path.abspath(config_file)
  if path.startswith(REPO_ROOT + os.sep):
    return os.path.relpath(path, REPO_ROOT)
  return path


def expand_grid(config: str, axes: dict[str, list[str]], seeds: Sequence[int],
                overrides: Sequence[str], workdir_root: str) -> list[Run]:
  """Every combination of the axes' values x seeds, with stable ids.

  Args:
    config: config file, optionally with its own argument string ("configs/spectrum.py:runlocal").
    axes: swept axis -> values (already validated); axes not given keep the config's defaults.
    seeds: the seeds of every setting.
    overrides: "--config.KEY=VALUE" arguments passed to every run.
    workdir_root: parent folder of the runs' workdirs.
  """
  config_file, _, base_arg = config.partition(":")
  base_items = [item for item in base_arg.split(",") if item]
  for item in base_items:
    key = item.partition("=")[0]
    if key in {AXES[a][0] for a in axes}:
      raise ValueError(f"--config={config!r} sets {key!r}, which the sweep also sets with "
                       f"--{key.replace('_', '-')}; give it in one place.")
  names = [a for a in AXES if a in axes]
  runs = []
  for values in itertools.product(*(axes[a] for a in names)):
    settings = tuple(zip(names, values))
    arg = ",".join(base_items + [f"{AXES[a][0]}={v}" for a, v in settings])
    config_with_arg = f"{config_file}:{arg}" if arg else config_file
    # The hash names everything that defines a run except the seed (which is in the id itself), so
    # the seeds of one setting share it.
    identity = json.dumps({"config": _config_path_for_id(config_file), "arg": arg,
                           "overrides": sorted(overrides)}, sort_keys=True)
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    readable = "_".join(f"{_ID_NAMES[a]}-{v}" for a, v in settings)
    for seed in seeds:
      run_id = f"{readable}_seed-{seed}_{digest}" if readable else f"seed-{seed}_{digest}"
      runs.append(Run(run_id=run_id, workdir=os.path.join(workdir_root, run_id),
                      config=config_with_arg, settings=settings, seed=int(seed),
                      overrides=tuple(overrides)))
  return runs


def main_command(run: Run, python: str) -> list[str]:
  return [python, "-m", "xception_jax.main", *run.main_args()]


def launcher_command(run: Run, launcher: str, launcher_args: Sequence[str],
                     first: bool) -> list[str]:
  """The cluster launcher's command line for one run (main args after '--')."""
  command = [os.path.join(REPO_ROOT, CLUSTER_SCRIPTS[launcher]), *launcher_args]
  if launcher == "tpu" and not first:
    command += ["--skip-sync", "--skip-install"]  # the first run synced and installed
  if launcher == "slurm" and not any(a.startswith("--job-name=") for a in launcher_args):
    command.append(f"--job-name={run.run_id}")
  return command + ["--", *run.main_args()]


def _write_sweep_record(run: Run, command: Sequence[str]) -> None:
  """sweep.json in the workdir: the grid settings as the sweep named them, for reports."""
  paths.makedirs(run.workdir)
  record = {"run_id": run.run_id, "settings": dict(run.settings), "seed": run.seed,
            "config": run.config, "overrides": list(run.overrides), "command": list(command)}
  paths.write_json(os.path.join(run.workdir, "sweep.json"), record)


def _run_and_log(command: Sequence[str], log_path: str) -> int:
  """Runs `command`, streaming its output to the console and appending it to `log_path`."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  log = paths.open_append(log_path)  # gs://: rewritten at most every 30 s, and at the end
  try:
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, text=True, bufsize=1)
    try:
      for line in process.stdout:
        sys.stdout.write(line)
        log.write(line)
        log.flush()
    except KeyboardInterrupt:
      process.terminate()  # the main job saves a checkpoint on SIGTERM
      process.wait()
      raise
    return process.wait()
  finally:
    log.close()


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="launch/sweep.py", allow_abbrev=False,
      description="Grid sweep over the spectrum (see the module docstring). Extra "
                  "--config.KEY=VALUE arguments are passed to every run.")
  parser.add_argument("--config", required=True,
                      help="config file, optionally with arguments: configs/spectrum.py[:runlocal]")
  parser.add_argument("--segments", required=True,
                      help="comma-separated segment counts and/or 'depthwise', e.g. 1,4,16,depthwise")
  parser.add_argument("--order", help="comma-separated: depthwise_first, pointwise_first")
  parser.add_argument("--mid-activation", dest="mid_activation",
                      help="comma-separated: none, relu, elu")
  parser.add_argument("--residual", help="comma-separated: true, false")
  parser.add_argument("--budget", help="comma-separated: params (equal parameter count), none")
  parser.add_argument("--seeds", type=int, default=1, help="seeds per setting: 0 .. N-1 "
                      "(from --first-seed)")
  parser.add_argument("--first-seed", dest="first_seed", type=int, default=0)
  parser.add_argument("--runlocal", action="store_true",
                      help="add 'runlocal' to the config arguments (CPU-sized runs, embedded data)")
  parser.add_argument("--workdir-root", dest="workdir_root", required=True,
                      help="parent folder of the runs' workdirs")
  parser.add_argument("--launcher", choices=LAUNCHERS, default="local")
  parser.add_argument("--launcher-args", dest="launcher_args", default="",
                      help="options for launch/tpu_vm.sh or launch/slurm.sh, as one string")
  parser.add_argument("--python", default=sys.executable,
                      help="interpreter for local runs (default: this one)")
  parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                      help="print one `python -m xception_jax.main ...` command per run; run none")
  args, extra = parser.parse_known_args(argv)
  for item in extra:
    if not item.startswith("--config.") or "=" not in item:
      parser.error(f"unrecognised argument {item!r}: only --config.KEY=VALUE overrides are "
                   "passed through to the runs.")
    if item.startswith("--config.seed="):
      parser.error("--config.seed is set per run by the sweep; use --seeds / --first-seed.")
  return args, extra


def build_runs(args: argparse.Namespace, overrides: Sequence[str]) -> list[Run]:
  """The validated grid from the parsed flags; raises ValueError naming the flag at fault."""
  config_file = args.config.partition(":")[0]
  if not os.path.isfile(config_file):
    raise ValueError(f"--config: no config file {config_file!r} (e.g. configs/spectrum.py).")
  if args.seeds < 1:
    raise ValueError(f"--seeds={args.seeds}: must be >= 1 (seeds per setting).")
  if args.first_seed < 0:
    raise ValueError(f"--first-seed={args.first_seed}: must be >= 0.")
  axes = {}
  for axis in AXES:
    value = getattr(args, axis)
    if value is not None:
      axes[axis] = _check_values(axis, _split_list(axis, value))
  config = args.config
  if args.runlocal and "runlocal" not in config.partition(":")[2].split(","):
    config += ("," if ":" in config else ":") + "runlocal"
  seeds = range(args.first_seed, args.first_seed + args.seeds)
  root = args.workdir_root
  if "://" not in root and args.launcher != "tpu":
    # Printed and submitted commands then work from any folder. On a TPU VM a relative root
    # stays relative: to the code folder on the workers, where the job runs.
    root = os.path.abspath(root)
  return expand_grid(config, axes, seeds, overrides, root)


def main(argv: Sequence[str]) -> int:
  args, overrides = parse_args(argv)
  try:
    runs = build_runs(args, overrides)
  except ValueError as e:
    print(f"launch/sweep.py: error: {e}", file=sys.stderr)
    return 2
  launcher_args = shlex.split(args.launcher_args)
  if args.launcher == "local" and launcher_args:
    print("launch/sweep.py: error: --launcher-args is for --launcher=tpu or slurm.", file=sys.stderr)
    return 2

  failed, started, skipped = [], 0, 0
  first_cluster_run = True
  for run in runs:
    status = run_status(run.workdir)
    command = main_command(run, args.python)
    wrapped = (command if args.launcher == "local" else
               launcher_command(run, args.launcher, launcher_args, first_cluster_run))
    if args.dry_run:
      print(f"# {run.run_id}: {status.describe()}")
      if status.state != "finished":
        print(shlex.join(command))
        if args.launcher != "local":
          print(f"#   via: {shlex.join(wrapped)}")
          first_cluster_run = False
      continue
    if status.state == "finished":
      print(f"[sweep] {run.run_id}: {status.describe()}", flush=True)
      skipped += 1
      continue
    print(f"[sweep] {run.run_id}: {status.describe()}\n[sweep] $ {shlex.join(wrapped)}", flush=True)
    _write_sweep_record(run, command)
    rc = _run_and_log(wrapped, os.path.join(run.workdir, "sweep.log"))
    first_cluster_run = False
    started += 1
    if rc == 75:  # xception_jax.preemption.PREEMPTED_EXIT_STATUS: saved, resumable
      print(f"[sweep] {run.run_id}: preempted; its checkpoint is saved and the next sweep "
            "command resumes it. Stopping the sweep here.", flush=True)
      return 75
    if rc != 0:
      print(f"[sweep] {run.run_id}: FAILED with exit status {rc} (log: "
            f"{os.path.join(run.workdir, 'sweep.log')}); going on with the others.", flush=True)
      failed.append(run.run_id)
  if not args.dry_run:
    verb = "submitted" if args.launcher == "slurm" else "ran"
    print(f"[sweep] {len(runs)} runs: {started} {verb}, {skipped} already finished, "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''}.", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
