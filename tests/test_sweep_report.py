"""launch/sweep.py (grid, stable ids, skip/resume) and tools/report.py (CSV and plots).

The report is tested on run folders written here with known metrics, so every number in the CSV
and every averaged point can be checked exactly; the end-to-end test (slow) runs a real tiny
sweep on the embedded data, re-runs it, and reports on it.
"""

import csv
import importlib.util
import json
import math
import os
import shlex
import statistics
import subprocess
import sys

import pytest
import xla_flags

from xception_jax.models import costs
from xception_jax.tools import report
from xception_jax.tools import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_PY = os.path.join(REPO, "launch", "sweep.py")


def _load_sweep_module():
  """launch/ is scripts, not a package: load sweep.py by path (dataclasses need sys.modules)."""
  spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP_PY)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep_module()


def _sweep(*args, timeout=120):
  # One CPU device per run (not conftest's 8 fake ones): faster to compile on a small machine.
  env = xla_flags.environ_without_device_count()
  return subprocess.run(
    [sys.executable, SWEEP_PY, *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=timeout,
    env=env,
  )


def _commands(stdout):
  """The dry run's command lines (comments left out), split into argv lists."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# ------------------------------------------------------------------------------------------------
# sweep.py
# ------------------------------------------------------------------------------------------------


def test_sweep_dry_run_prints_one_main_command_per_grid_point(tmp_path):
  args = [
    "--config=configs/spectrum.py",
    "--segments=1,4,depthwise",
    "--budget=params,none",
    "--seeds=2",
    f"--workdir_root={tmp_path}",
    "--dry_run",
    "--config.total_steps=7",
  ]
  result = _sweep(*args)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert len(commands) == 3 * 2 * 2
  grid = set()
  for argv in commands:
    assert argv[:3] == [sys.executable, "-m", "xception_jax.main"]
    config = _flag(argv, "--config")
    path, _, arg = config.partition(":")
    assert path == "configs/spectrum.py"
    options = dict(item.split("=") for item in arg.split(","))
    assert set(options) == {"segments", "budget"}
    seed = int(_flag(argv, "--config.seed"))
    assert argv[-1] == f"--config.seed={seed}"  # after the overrides: the sweep's seed wins
    assert _flag(argv, "--config.total_steps") == "7"
    workdir = _flag(argv, "--workdir")
    assert os.path.dirname(workdir) == str(tmp_path)
    assert os.path.basename(workdir).startswith(
      f"segments-{options['segments']}_budget-{options['budget']}_seed-{seed}_"
    )
    grid.add((options["segments"], options["budget"], seed, workdir))
  assert {g[:3] for g in grid} == {
    (s, b, seed) for s in ("1", "4", "depthwise") for b in ("params", "none") for seed in (0, 1)
  }
  assert len({g[3] for g in grid}) == 12  # one workdir per run

  # Stable: the same command gives the same ids; other overrides give other ids; the seeds of
  # one setting share the settings hash.
  assert _sweep(*args).stdout == result.stdout
  other = _commands(_sweep(*args[:-1], "--config.total_steps=8").stdout)
  assert not {_flag(a, "--workdir") for a in other} & {g[3] for g in grid}
  by_setting = {}
  for segments, budget, _, workdir in grid:
    by_setting.setdefault((segments, budget), set()).add(workdir.rsplit("_", 1)[1])
  assert all(len(hashes) == 1 for hashes in by_setting.values())
  assert len({h for hashes in by_setting.values() for h in hashes}) == 6


def _fake_run(workdir, total_steps, checkpoint_steps, metrics=(), config=None, run_info=None):
  """A run folder as the main job leaves it (no real checkpoint contents needed)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config or {}, f)
  with open(os.path.join(workdir, "run.json"), "w") as f:
    json.dump({"total_steps": total_steps, **(run_info or {})}, f)
  for step in checkpoint_steps:
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in metrics:
      f.write(json.dumps(record) + "\n")


def test_sweep_skips_finished_runs_and_resumes_unfinished(tmp_path):
  args = [
    "--config=configs/spectrum.py:runlocal",
    "--segments=1,depthwise",
    "--seeds=1",
    f"--workdir_root={tmp_path}",
    "--dry_run",
  ]
  first = _commands(_sweep(*args).stdout)
  finished, unfinished = (_flag(argv, "--workdir") for argv in first)
  _fake_run(finished, 20, [10, 20])
  _fake_run(unfinished, 20, [10])
  os.makedirs(os.path.join(unfinished, "checkpoints", "20.orbax-checkpoint-tmp-1"))  # torn save

  assert sweep.run_status(finished) == sweep.RunStatus("finished", 20, 20)
  assert sweep.run_status(unfinished) == sweep.RunStatus("unfinished", 10, 20)
  assert sweep.run_status(str(tmp_path / "absent")).state == "new"

  result = _sweep(*args)
  lines = result.stdout.splitlines()
  assert f"# {os.path.basename(finished)}: finished at step 20: skipped" in lines
  assert f"# {os.path.basename(unfinished)}: unfinished: resumes from step 10 of 20" in lines
  assert [_flag(argv, "--workdir") for argv in _commands(result.stdout)] == [unfinished]


def test_sweep_hands_runs_to_a_cluster_launcher(tmp_path):
  result = _sweep(
    "--config=configs/spectrum.py",
    "--segments=1,8",
    "--seeds=1",
    f"--workdir_root={tmp_path}",
    "--dry_run",
    "--launcher=slurm",
    "--launcher_args=--nodes=2 --gpus-per-node=4",
  )
  assert result.returncode == 0, result.stderr
  via = [
    shlex.split(line.split("via: ", 1)[1])
    for line in result.stdout.splitlines()
    if line.startswith("#   via: ")
  ]
  mains = _commands(result.stdout)
  assert len(via) == len(mains) == 2
  for wrapped, main in zip(via, mains):
    run_id = os.path.basename(_flag(main, "--workdir"))
    separator = wrapped.index("--")
    assert wrapped[:separator] == [
      os.path.join(REPO, "launch", "slurm.sh"),
      "--nodes=2",
      "--gpus-per-node=4",
      f"--job-name={run_id}",
    ]
    assert wrapped[separator + 1 :] == main[3:]  # the same main args


@pytest.mark.parametrize(
  "args, message",
  [
    (["--segments=1,three"], "--segments: 'three' is not a segment count"),
    (["--segments=1,1"], "lists a value twice"),
    (["--segments=1", "--budget=maybe"], "--budget: 'maybe' is not valid; valid: params, none"),
    (["--segments=1", "--order=random"], "--order: 'random' is not valid"),
    (["--segments=1", "--seeds=0"], "--seeds=0: must be >= 1"),
    (["--segments=1", "--config.seed=3"], "--config.seed is set per run"),
    (["--segments=1", "--learning-rate=3"], "unrecognised argument '--learning-rate=3'"),
    (["--segments=1", "--config=configs/nope.py"], "no config file 'configs/nope.py'"),
    (["--segments=4", "--config=configs/spectrum.py:segments=8"], "sets 'segments'"),
  ],
)
def test_sweep_rejects_bad_input(tmp_path, args, message):
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=configs/spectrum.py", *args]
  result = _sweep(*args, f"--workdir_root={tmp_path}", "--dry_run")
  assert result.returncode == 2
  assert message in result.stderr


# ------------------------------------------------------------------------------------------------
# report.py on run folders with known metrics.
# ------------------------------------------------------------------------------------------------

MODEL = "xception_tiny"
IMAGE_SIZE = 72


def _final_top1(g, seed, budget):
  return 0.5 + 0.02 * math.log2(g) + 0.01 * seed + (0.05 if budget == "params" else 0.0)


def _write_known_runs(root):
  """Xception runs over segments x budget x 2 seeds, one unfinished run, one Inception run."""
  expected = {}
  for segments in ("1", "4", "depthwise"):
    for budget in ("", "params"):
      for seed in (0, 1):
        model = dict(
          segments=segments,
          budget=budget,
          order="depthwise_first",
          mid_activation="none",
          residual=True,
          dropout_rate=0.5,
        )
        cost = costs.model_cost(
          MODEL, image_size=IMAGE_SIZE, num_classes=10, **{**model, "budget": budget or None}
        )
        g = dict(cost.architecture.layer_segments)["block5_sepconv1"]
        final = _final_top1(g, seed, budget)
        speeds = [3.0, 100.0 + seed, 120.0 + seed, 110.0 + seed]  # the first includes compiling
        metrics = []
        for i, step in enumerate((2, 4, 6, 8)):
          metrics.append(
            {
              "step": step,
              "train/loss": 2.0 - 0.1 * i,
              "train/top1": 0.1 * i,
              "train/images_per_sec": speeds[i],
            }
          )
          if step % 4 == 0:
            top1 = final if step == 8 else final + 0.03  # the best is not the last
            metrics.append(
              {
                "step": step,
                "eval/loss": 1.0 + step / 100,
                "eval/top1": top1 - 0.01,
                "eval/ema_top1": top1,
                "eval/top5": 0.9,
                "eval/examples": 600,
              }
            )
        name = f"seg{segments}_budget{budget or 'none'}_seed{seed}"
        _fake_run(
          os.path.join(root, "sweep", name),
          8,
          [4, 8],
          metrics,
          config=dict(
            model_name=MODEL,
            model=model,
            image_size=IMAGE_SIZE,
            seed=seed,
            batch_size=16,
            dataset="embedded_shapes",
            best_metric="",
          ),
          run_info=dict(
            num_params=cost.params,
            num_classes=10,
            multi_label=False,
            devices=1,
            dataset="embedded_shapes",
          ),
        )
        expected[os.path.join("sweep", name)] = dict(
          segments=segments,
          budget=budget or "none",
          seed=seed,
          g=g,
          final=final,
          best=final + 0.03,
          params=cost.params,
          macs=cost.macs_total,
          images_per_sec=110.0 + seed,
        )
  _fake_run(
    os.path.join(root, "unfinished"),
    8,
    [4],
    [{"step": 4, "train/loss": 2.0, "eval/ema_top1": 0.99}],
    config=dict(model_name=MODEL, model=dict(segments="2"), image_size=IMAGE_SIZE, seed=0),
    run_info=dict(num_params=1, num_classes=10),
  )
  _fake_run(
    os.path.join(root, "inception"),
    2,
    [2],
    [{"step": 2, "train/loss": 2.0, "train/images_per_sec": 50.0, "eval/ema_top1": 0.7}],
    config=dict(model_name="inception_v3_tiny", model={}, image_size=80, seed=0),
    run_info=dict(num_params=123, num_classes=10),
  )
  return expected


def test_report_csv_and_plots_from_known_runs(tmp_path):
  expected = _write_known_runs(str(tmp_path))
  result = report.write_report(str(tmp_path))
  out = tmp_path / "report"
  assert result["csv"] == str(out / "runs.csv")
  with open(out / "runs.csv") as f:
    rows = {row["run"]: row for row in csv.DictReader(f)}
  assert set(rows) == set(expected) | {"unfinished", "inception"}

  for run, want in expected.items():
    row = rows[run]
    assert row["status"] == "finished" and row["step"] == "8" and row["total_steps"] == "8"
    assert (row["model_name"], row["segments"], row["budget"], row["seed"]) == (
      MODEL,
      want["segments"],
      want["budget"],
      str(want["seed"]),
    )
    assert int(row["params"]) == want["params"] == int(row["analytic_params"])
    assert int(row["macs"]) == want["macs"]
    assert int(row["middle_segments"]) == want["g"]
    assert row["headline_metric"] == "eval/ema_top1"
    assert float(row["final"]) == pytest.approx(want["final"])
    assert float(row["final_eval/ema_top1"]) == pytest.approx(want["final"])
    assert float(row["best"]) == pytest.approx(want["best"])
    assert float(row["best_eval/loss"]) == pytest.approx(1.04)  # lower is better for losses
    assert float(row["final_eval/loss"]) == pytest.approx(1.08)
    assert float(row["final_train/loss"]) == pytest.approx(1.7)
    assert float(row["images_per_sec"]) == pytest.approx(want["images_per_sec"])
  assert rows["unfinished"]["status"] == "unfinished"
  assert rows["inception"]["status"] == "finished" and rows["inception"]["macs"] == ""

  # depthwise = one segment per channel: G is the middle flow's width, on the same log2 axis.
  depthwise = [w for w in expected.values() if w["segments"] == "depthwise"]
  assert all(w["g"] > 4 for w in depthwise)

  # Spectrum points: one curve per budget, mean and sample std over the 2 seeds.
  plotted = [r for r in result["rows"] if r["status"] == "finished" and r.get("middle_segments")]
  curves = runs.spectrum_points(plotted)
  assert set(curves) == {"budget=none", "budget=params"}
  for label, points in curves.items():
    budget = label.split("=")[1]
    assert [p["segments"] for p in points] == ["1", "4", "depthwise"]
    for p in points:
      finals = [
        w["final"]
        for w in expected.values()
        if w["budget"] == budget and w["segments"] == p["segments"]
      ]
      assert p["n"] == 2 and p["x"] == pytest.approx(math.log2(p["G"]))
      assert p["mean"] == pytest.approx(statistics.fmean(finals))
      assert p["std"] == pytest.approx(statistics.stdev(finals))

  written = {os.path.relpath(p, out) for p in result["plots"]}
  assert {"curves.png", "spectrum.png", "tradeoffs.png"} <= written
  assert {os.path.join("curves", r.replace(os.sep, "_") + ".png") for r in rows} <= written
  for path in result["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def test_report_refuses_a_folder_without_runs(tmp_path):
  with pytest.raises(FileNotFoundError, match="No runs under"):
    report.write_report(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    report.write_report(str(tmp_path / "absent"))


def test_report_reads_a_resumed_run_as_its_latest_attempt():
  """Attempt 1 logged steps 2, 4, 6 and was killed after checkpointing step 4; attempt 2 resumed
  from step 4 and logged 6 and 8: attempt 1's step 6 is superseded."""
  records = [
    {"step": 2, "train/loss": 3.0},
    {"step": 4, "train/loss": 2.5},
    {"step": 4, "eval/ema_top1": 0.4},
    {"step": 6, "train/loss": 2.0},
    {"step": 6, "eval/ema_top1": 0.9},  # lost with attempt 1
    {"step": 6, "train/loss": 2.1},
    {"step": 6, "eval/ema_top1": 0.5},
    {"step": 8, "train/loss": 1.8},
    {"step": 8, "eval/ema_top1": 0.45},
  ]
  series = runs.metric_series(records)
  assert series["train/loss"] == [(2, 3.0), (4, 2.5), (6, 2.1), (8, 1.8)]
  assert series["eval/ema_top1"] == [(4, 0.4), (6, 0.5), (8, 0.45)]
  summary = runs.summarize_metrics(records)
  assert summary["final_eval/ema_top1"] == 0.45 and summary["best_eval/ema_top1"] == 0.5


def test_report_survives_a_torn_metrics_line(tmp_path):
  _fake_run(
    str(tmp_path / "run"),
    4,
    [4],
    [{"step": 4, "train/loss": 1.5, "eval/ema_top1": 0.5}],
    config=dict(model_name=MODEL, model={}, image_size=IMAGE_SIZE, seed=0),
    run_info=dict(num_params=1, num_classes=10),
  )
  with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')  # killed mid-write
  rows = runs.collect(str(tmp_path))
  assert len(rows) == 1 and rows[0]["final"] == 0.5 and rows[0]["final_train/loss"] == 1.5


# ------------------------------------------------------------------------------------------------
# End to end: a real tiny sweep, re-run, report.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory):
  """One tfds data_dir per test session: the embedded dataset is generated once, on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.mark.slow
def test_tiny_sweep_end_to_end_rerun_skips_then_report(tmp_path, tfds_data_dir):
  root = tmp_path / "sweep"
  args = [
    "--config=configs/spectrum.py",
    "--segments=1,depthwise",
    "--budget=params",
    "--seeds=2",
    "--runlocal",
    f"--workdir_root={root}",
    "--config.total_steps=4",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.image_size=72",
    "--config.batch_size=16",
    "--config.eval_batch_size=200",
    f"--config.data_dir={tfds_data_dir}",
  ]
  first = _sweep(*args, timeout=1800)
  assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-5000:]
  assert "[sweep] 4 runs: 4 ran, 0 already finished, 0 failed." in first.stdout
  workdirs = sorted(str(p) for p in root.iterdir())
  assert len(workdirs) == 4
  before = {w: (root / w / "metrics.jsonl").read_text() for w in workdirs}
  assert all(sweep.run_status(w).state == "finished" for w in workdirs)

  # Re-run: everything is finished, nothing is started, nothing is written.
  again = _sweep(*args)
  assert again.returncode == 0, again.stderr
  assert "[sweep] 4 runs: 0 ran, 4 already finished, 0 failed." in again.stdout
  assert {w: (root / w / "metrics.jsonl").read_text() for w in workdirs} == before

  # An interrupted run (last checkpoint lost) resumes from its previous one and finishes.
  interrupted = workdirs[0]
  os.rename(os.path.join(interrupted, "checkpoints", "4"), str(tmp_path / "removed_checkpoint"))
  resumed = _sweep(*args, timeout=1800)
  assert resumed.returncode == 0, resumed.stdout[-5000:]
  assert f"{os.path.basename(interrupted)}: unfinished: resumes from step 2 of 4" in resumed.stdout
  assert "[sweep] 4 runs: 1 ran, 3 already finished, 0 failed." in resumed.stdout
  assert sweep.run_status(interrupted).state == "finished"

  out = tmp_path / "report"
  reported = subprocess.run(
    [sys.executable, "-m", "xception_jax.tools.report", f"--root={root}", f"--out={out}"],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=600,
  )
  assert reported.returncode == 0, reported.stderr[-5000:]
  assert "4 runs (4 finished)" in reported.stdout
  with open(out / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["segments"], r["seed"]) for r in rows) == [
    ("1", "0"),
    ("1", "1"),
    ("depthwise", "0"),
    ("depthwise", "1"),
  ]
  for row in rows:
    with open(os.path.join(root, row["run"], "run.json")) as f:
      run = json.load(f)
    with open(os.path.join(root, row["run"], "metrics.jsonl")) as f:
      evals = {r["step"]: r["eval/ema_top1"] for r in map(json.loads, f) if "eval/ema_top1" in r}
    assert row["status"] == "finished" and row["budget"] == "params"
    assert row["model_name"] == "xception_tiny" and row["dataset"] == "embedded_shapes"
    assert int(row["params"]) == run["num_params"] == int(row["analytic_params"])
    assert int(row["macs"]) > 0 and float(row["images_per_sec"]) > 0
    assert sorted(evals) == [2, 4]  # the resumed run's step-4 eval replaces the lost one
    assert float(row["final"]) == pytest.approx(evals[4])
    assert float(row["best"]) == pytest.approx(max(evals.values()))
  for name in ["curves.png", "spectrum.png", "tradeoffs.png"] + [
    os.path.join("curves", r["run"] + ".png") for r in rows
  ]:
    assert (out / name).stat().st_size > 10_000, name
