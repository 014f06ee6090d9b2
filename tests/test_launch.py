"""Launchers: local.sh against a single-process run, and the cluster launchers' command lines.

The cluster launchers cannot reach a cluster here, so their --dry-run output is parsed back into
argument lists (checking the quoting survives), and the commands they really run are captured
with stand-ins for gcloud / scontrol / srun / python on PATH: what --dry-run prints must be what
runs, and the $SLURM_* variables must expand per task as intended.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
TPU_VM_SH = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM_SH = os.path.join(REPO, "launch", "slurm.sh")

MAIN_ARGS = [
  "--config=configs/quickstart.py",
  "--workdir=/runs/a b",
  "--config.data_dir=/data/it's here",
]


def _write_executable(path, text):
  with open(path, "w") as f:
    f.write(textwrap.dedent(text).lstrip())
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return str(path)


def _run(command, env=None, timeout=120, **kwargs):
  return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def _argv_recorder(bin_dir, name, log_path):
  """A stand-in program that appends its argv (as JSON) to log_path and succeeds."""
  return _write_executable(
    bin_dir / name,
    f"""
      #!{sys.executable}
      import json, sys
      with open({str(log_path)!r}, "a") as f:
          f.write(json.dumps(sys.argv[1:]) + "\\n")
      """,
  )


# ------------------------------------------------------------------------------------------------
# Cloud TPU VM.
# ------------------------------------------------------------------------------------------------


def test_tpu_vm_dry_run_prints_sync_install_and_run_on_all_workers():
  result = _run(
    [
      TPU_VM_SH,
      "--tpu=my-v4-32",
      "--zone=us-central2-b",
      "--project=proj",
      "--dry-run",
      "--",
      *MAIN_ARGS,
    ]
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 5, result.stdout
  pack, scp, unpack, install, run = lines
  assert pack.startswith(f"git -C {REPO} ls-files")
  assert "| tar -czf " in pack

  scp = shlex.split(scp)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6] == "my-v4-32:xception_jax-src.tar.gz"
  assert scp[5] == shlex.split(pack.split("| tar -czf ")[1])[0]  # the tarball just packed
  assert {"--zone=us-central2-b", "--project=proj", "--worker=all"} <= set(scp)

  gcloud_ssh = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-v4-32",
    "--zone=us-central2-b",
    "--project=proj",
    "--worker=all",
    "--command",
  ]
  for line in (unpack, install, run):
    argv = shlex.split(line)
    assert argv[:-1] == gcloud_ssh
  assert "tar -xzf xception_jax-src.tar.gz -C xception_jax" in shlex.split(unpack)[-1]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    jax_line = next(line.strip() for line in f if line.startswith("jax"))
  install_command = shlex.split(shlex.split(install)[-1])
  assert install_command[-3:] == ["-r", "requirements.txt", "jax[tpu]" + jax_line[len("jax") :]]

  remote = shlex.split(shlex.split(run)[-1])  # the remote shell's own word splitting
  assert remote[:6] == ["cd", "xception_jax", "&&", ".", ".venv/bin/activate", "&&"]
  assert remote[6:] == ["python", "-m", "xception_jax.main", *MAIN_ARGS]


def test_tpu_vm_runs_exactly_what_dry_run_prints(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.jsonl"
  _argv_recorder(bin_dir, "gcloud", log)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  args = [TPU_VM_SH, "--tpu=t1", "--zone=z", "--skip-sync", "--detach", "--", *MAIN_ARGS]
  dry = _run(args[:4] + ["--dry-run"] + args[4:], env=env)
  real = _run(args, env=env)
  assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
  with open(log) as f:
    ran = [json.loads(line) for line in f]
  printed = [shlex.split(line)[1:] for line in dry.stdout.splitlines()]
  assert ran == printed
  assert len(ran) == 2  # install, then run (sync skipped)
  remote = ran[-1][-1]
  assert remote.startswith("cd xception_jax && . .venv/bin/activate && mkdir -p logs && nohup ")
  assert remote.endswith("> logs/main-$(hostname).log 2>&1 < /dev/null &")


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone=z", "--", "--workdir=w"], "--tpu=NAME is required"),
    (["--tpu=t", "--", "--workdir=w"], "--zone=ZONE is required"),
    (["--tpu=t", "--zone=z", "--", "--config=c.py"], "need --workdir"),
    (["--tpu=t", "--zone=z", "--", "--workdir=w", "--process_id=0"], "find each other"),
    (["--tpu=t", "--zone=z", "--workers=all"], "unknown option '--workers=all'"),
  ],
)
def test_tpu_vm_rejects_bad_arguments(args, message):
  result = _run([TPU_VM_SH, "--dry-run", *args])
  assert result.returncode == 2
  assert message in result.stderr


# ------------------------------------------------------------------------------------------------
# SLURM.
# ------------------------------------------------------------------------------------------------


def _slurm_script(stdout):
  """Splits the dry-run output into (batch script text, sbatch command argv)."""
  lines = stdout.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("# ---- batch script "))
  end = lines.index("# ---- submitted with ----")
  return "\n".join(lines[start + 1 : end]) + "\n", shlex.split(lines[end + 1]), lines[start]


def _fake_slurm(tmp_path, nodes, tasks_per_node):
  """scontrol and srun stand-ins: srun runs its command once per task with SLURM_* set."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(
    bin_dir / "scontrol",
    f"""
      #!/bin/bash
      [[ "$1 $2 $3" == "show hostnames node-[07-0{6 + nodes}]" ]] || exit 9
      for i in $(seq 7 {6 + nodes}); do printf 'node-%02d\\n' $i; done
      """,
  )
  _write_executable(
    bin_dir / "srun",
    f"""
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      for ((p = 0; p < SLURM_NTASKS; p++)); do
        SLURM_PROCID=$p SLURM_LOCALID=$((p % {tasks_per_node})) "$@" || exit $?
      done
      """,
  )
  log = tmp_path / "python.jsonl"
  python = _write_executable(
    tmp_path / "python",
    f"""
      #!{sys.executable}
      import json, os, sys
      with open({str(log)!r}, "a") as f:
          f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                              "ids": os.environ.get("JAX_LOCAL_DEVICE_IDS")}}) + "\\n")
      """,
  )
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "SLURM_JOB_NODELIST": f"node-[07-0{6 + nodes}]",
    "SLURM_JOB_ID": "5000",
    "SLURM_NTASKS": str(nodes * tasks_per_node),
  }
  return env, python, log


@pytest.mark.parametrize(
  "per, tasks_per_node, expected_ids",
  [
    ("gpu", 4, lambda p: str(p % 4)),
    ("host", 1, lambda p: "0,1,2,3"),
  ],
)
def test_slurm_dry_run_script_starts_one_process_per_gpu_or_host(
  tmp_path, per, tasks_per_node, expected_ids
):
  env, python, log = _fake_slurm(tmp_path, nodes=2, tasks_per_node=tasks_per_node)
  result = _run(
    [
      SLURM_SH,
      "--nodes=2",
      "--gpus-per-node=4",
      f"--per={per}",
      "--partition=gpu",
      "--time=1:00:00",
      f"--python={python}",
      f"--log-dir={tmp_path}/logs",
      "--dry-run",
      "--",
      *MAIN_ARGS,
    ],
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  script, sbatch, header = _slurm_script(result.stdout)
  script_path = f"{tmp_path}/logs/xception_jax.sbatch"
  assert header == f"# ---- batch script {script_path} ----"
  assert sbatch == ["sbatch", "--parsable", script_path]
  directives = [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]
  assert directives == [
    "--job-name=xception_jax",
    "--nodes=2",
    f"--ntasks-per-node={tasks_per_node}",
    "--gpus-per-node=4",
    "--time=1:00:00",
    f"--output={tmp_path}/logs/%x-%j.out",
    "--signal=B:TERM@120",
    "--requeue",
    "--partition=gpu",
  ]

  # Run the batch script as SLURM would (2 nodes), with stand-ins printing what each task got.
  script_file = tmp_path / "job.sh"
  script_file.write_text(script)
  ran = _run(["bash", str(script_file)], env=env, cwd="/")
  assert ran.returncode == 0, ran.stderr
  with open(log) as f:
    tasks = [json.loads(line) for line in f]
  num_processes = 2 * tasks_per_node
  assert len(tasks) == num_processes
  port = 61440 + 5000 % 4096
  for p, task in enumerate(tasks):
    assert task["argv"] == [
      "-m",
      "xception_jax.main",
      *MAIN_ARGS,
      f"--coordinator_address=node-07:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={p}",
    ]
    assert task["ids"] == expected_ids(p)
    assert task["cwd"] == str(tmp_path)  # relative paths mean what they meant at submission


def test_slurm_submits_the_script_it_prints(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(
    bin_dir / "sbatch",
    f"""
      #!/bin/bash
      cp "${{@: -1}}" {tmp_path}/submitted.sh
      echo 4242
      """,
  )
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  args = [
    SLURM_SH,
    "--job-name=run-7",
    "--python=/opt/py/bin/python",
    f"--log-dir={tmp_path}",
    "--",
    *MAIN_ARGS,
  ]
  dry = _run(args[: -len(MAIN_ARGS) - 1] + ["--dry-run"] + args[-len(MAIN_ARGS) - 1 :], env=env)
  real = _run(args, env=env)
  assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
  assert "Submitted job 4242" in real.stdout
  assert (tmp_path / "run-7.sbatch").read_text() == (tmp_path / "submitted.sh").read_text()
  assert (tmp_path / "submitted.sh").read_text() == _slurm_script(dry.stdout)[0]


def _preemptible_job(tmp_path, srun_body):
  """The batch script with stand-ins: scontrol logs its argv; srun runs `srun_body`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(
    bin_dir / "scontrol",
    f"""
      #!/bin/bash
      if [[ "$1" == show ]]; then echo node-07; exit 0; fi
      echo "$*" >> {tmp_path}/scontrol.log
      """,
  )
  _write_executable(bin_dir / "srun", "#!/bin/bash\n" + textwrap.dedent(srun_body))
  result = _run(
    [
      SLURM_SH,
      "--python=/usr/bin/python3",
      f"--log-dir={tmp_path}",
      "--dry-run",
      "--",
      "--workdir=w",
    ]
  )
  assert result.returncode == 0, result.stderr
  script_file = tmp_path / "job.sh"
  script_file.write_text(_slurm_script(result.stdout)[0])
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "SLURM_JOB_NODELIST": "node-07",
    "SLURM_JOB_ID": "5000",
    "SLURM_NTASKS": "1",
  }
  return script_file, env


def test_slurm_job_requeues_itself_when_the_run_saved_for_preemption(tmp_path):
  script, env = _preemptible_job(tmp_path, "exit 75\n")
  ran = _run(["bash", str(script)], env=env, cwd=tmp_path)
  assert ran.returncode == 75
  assert (tmp_path / "scontrol.log").read_text() == "requeue 5000\n"
  assert "requeueing job 5000" in ran.stderr

  (tmp_path / "failed").mkdir()
  script, env = _preemptible_job(tmp_path / "failed", "exit 1\n")
  ran = _run(["bash", str(script)], env=env, cwd=tmp_path)
  assert ran.returncode == 1 and not (tmp_path / "failed" / "scontrol.log").exists()


def test_slurm_batch_shell_passes_sigterm_on_to_srun(tmp_path):
  """--signal=B:TERM@120 signals the batch shell only; it must reach the processes."""
  script, env = _preemptible_job(
    tmp_path,
    f"""
      trap 'echo got-term >> {tmp_path}/srun.log; kill $!; exit 75' TERM
      echo started >> {tmp_path}/srun.log
      sleep 60 & wait
      """,
  )
  job = subprocess.Popen(
    ["bash", str(script)],
    env=env,
    cwd=tmp_path,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.time() + 30
  while not (tmp_path / "srun.log").exists() and time.time() < deadline:
    time.sleep(0.05)
  job.send_signal(signal.SIGTERM)
  _, err = job.communicate(timeout=30)
  assert job.returncode == 75, err
  assert (tmp_path / "srun.log").read_text() == "started\ngot-term\n"
  assert (tmp_path / "scontrol.log").read_text() == "requeue 5000\n"


@pytest.mark.parametrize(
  "args, message",
  [
    (["--no-requeue", "--signal-before=0"], "--signal-before must be a positive integer"),
    (["--per=node"], "--per must be 'gpu'"),
    (["--nodes=0"], "--nodes must be a positive integer"),
    (["--gpus-per-node=x"], "--gpus-per-node must be a positive integer"),
    (["--job-name=a b"], "--job-name="),
    (["--", "--config=c.py"], "need --workdir"),
    (["--", "--workdir=w", "--num_processes=2"], "set by the batch script"),
    (["--ntasks=3"], "unknown option '--ntasks=3'"),
  ],
)
def test_slurm_rejects_bad_arguments(args, message):
  if "--" not in args:
    args = args + ["--", "--workdir=w"]
  result = _run([SLURM_SH, "--dry-run", "--python=/usr/bin/python3", *args])
  assert result.returncode == 2, result.stdout
  assert message in result.stderr


# ------------------------------------------------------------------------------------------------
# local.sh
# ------------------------------------------------------------------------------------------------


def test_local_sh_stops_all_processes_when_one_fails(tmp_path):
  """Survivors would wait forever in a collective: they are killed, and the failure reported."""
  python = _write_executable(
    tmp_path / "python",
    """
      #!/bin/bash
      if [[ "$1" == "-c" ]]; then exec python3 "$@"; fi
      for arg in "$@"; do
        [[ "$arg" == --process_id=1 ]] && { echo "process 1 fails"; exit 7; }
      done
      echo "waiting in a collective"
      exec sleep 60
      """,
  )
  result = _run([LOCAL_SH, "3", "--workdir=w"], env={**os.environ, "PYTHON": python}, timeout=30)
  assert result.returncode == 7
  assert "[process 1] process 1 fails" in result.stdout
  assert "killing the others" in result.stderr


def test_local_sh_passes_sigterm_on_and_reports_it(tmp_path):
  python = _write_executable(
    tmp_path / "python",
    """
      #!/bin/bash
      if [[ "$1" == "-c" ]]; then exec python3 "$@"; fi
      trap 'echo "saving and stopping"; kill $!; exit 0' TERM
      echo ready
      sleep 60 &> /dev/null & wait
      """,
  )
  process = subprocess.Popen(
    [LOCAL_SH, "2", "--workdir=w"],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "PYTHON": python},
  )
  lines = [process.stdout.readline(), process.stdout.readline()]
  assert all(line.endswith("ready\n") for line in lines), lines
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=30)
  assert process.returncode == 143
  assert "[process 0] saving and stopping" in out and "[process 1] saving and stopping" in out


def test_local_sh_passes_the_preempted_status_through(tmp_path):
  """Exit 75 (saved, resumable) is not a failure: the others are not killed, 75 comes out."""
  python = _write_executable(
    tmp_path / "python",
    """
      #!/bin/bash
      if [[ "$1" == "-c" ]]; then exec python3 "$@"; fi
      for arg in "$@"; do
        [[ "$arg" == --process_id=1 ]] && { sleep 1; echo "saved too"; exit 75; }
      done
      echo "saved"
      exit 75
      """,
  )
  result = _run([LOCAL_SH, "2", "--workdir=w"], env={**os.environ, "PYTHON": python}, timeout=30)
  assert result.returncode == 75, result.stderr
  assert "[process 1] saved too" in result.stdout  # not killed when process 0 stopped first
  assert "killing the others" not in result.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    (["0"], "must be a positive integer"),
    (["two"], "must be a positive integer"),
    (["2", "--process_id=1"], "is set by this script"),
  ],
)
def test_local_sh_rejects_bad_arguments(args, message):
  result = _run([LOCAL_SH, *args])
  assert result.returncode == 2
  assert message in result.stderr


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_local_sh_two_processes_match_one_process(tmp_path):
  """2 processes x 1 CPU device == 1 process x 2 CPU devices, step by step.

  The quickstart on the synthetic dataset: its training batch at step s is generated from
  (seed, s) as one global array, whatever the number of processes, so both runs see the same
  global batches and the same 2-device data-parallel computation; only the transport differs
  (gloo between processes vs. in-process). The tf.data datasets are not used here because each
  process reads and shuffles its own shard of the files, so the global batches of a 1-process
  and a 2-process run differ by design.
  """
  args = [
    "--config=configs/quickstart.py:runlocal",
    "--config.dataset=synthetic",
    "--config.num_classes=10",
    "--config.image_size=72",
    "--config.batch_size=8",
    "--config.eval_batch_size=1000",
    "--config.total_steps=3",
    "--config.log_every_steps=1",
    "--config.lr.warmup_epochs=0",
    "--config.ema.decay=0.5",
  ]
  env = xla_flags.environ_without_device_count()
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=REPO)
  two = subprocess.Popen(
    [LOCAL_SH, "2", *args, f"--workdir={tmp_path}/two"],
    cwd=REPO,
    env={**env, "DEVICES_PER_PROCESS": "1"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  one = subprocess.Popen(
    [sys.executable, "-m", "xception_jax.main", *args, f"--workdir={tmp_path}/one"],
    cwd=REPO,
    env={**env, "XLA_FLAGS": f"{env['XLA_FLAGS']} {xla_flags.DEVICE_COUNT}=2"},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  two_out, _ = two.communicate(timeout=600)
  one_out, _ = one.communicate(timeout=600)
  assert two.returncode == 0, two_out[-5000:]
  assert one.returncode == 0, one_out[-5000:]

  for name, processes in (("two", 2), ("one", 1)):
    with open(tmp_path / name / "run.json") as f:
      run = json.load(f)
    assert (run["processes"], run["devices"]) == (processes, 2)
  assert "[process 1]" in two_out and "Process 1 of 2; 1 local and 2 global devices" in two_out

  losses_two, losses_one = _train_losses(tmp_path / "two"), _train_losses(tmp_path / "one")
  assert sorted(losses_two) == sorted(losses_one) == [1, 2, 3]
  np.testing.assert_allclose(
    [losses_two[s] for s in (1, 2, 3)], [losses_one[s] for s in (1, 2, 3)], rtol=1e-5
  )
  assert len(set(losses_one.values())) == 3  # the model trained: the loss moved

  from xception_jax import checkpointing  # pylint: disable=g-import-not-at-top

  params_two = checkpointing.load_variables(str(tmp_path / "two"))
  params_one = checkpointing.load_variables(str(tmp_path / "one"))
  assert params_two["step"] == params_one["step"] == 3
  leaves_two, leaves_one = (
    jax.tree.leaves(params_two["params"]),
    jax.tree.leaves(params_one["params"]),
  )
  assert len(leaves_two) == len(leaves_one) > 0
  for a, b in zip(leaves_two, leaves_one):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_after_sigterm_to_one(tmp_path):
  """JAX's preemption sync: SIGTERM to process 1 alone; both save the same step and exit 75."""
  args = [
    "--config=configs/quickstart.py:runlocal",
    "--config.dataset=synthetic",
    "--config.num_classes=10",
    "--config.image_size=72",
    "--config.batch_size=8",
    "--config.eval_batch_size=1000",
    "--config.total_steps=400",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",
    f"--workdir={tmp_path}",
  ]
  env = xla_flags.environ_without_device_count()
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=REPO, DEVICES_PER_PROCESS="1")
  job = subprocess.Popen(
    [LOCAL_SH, "2", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 500
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.2)
  worker = subprocess.run(
    ["pgrep", "-f", "--", f"--workdir={tmp_path} .*--process_id=1"], capture_output=True, text=True
  ).stdout.split()
  assert len(worker) == 1, worker
  os.kill(int(worker[0]), signal.SIGTERM)
  out, _ = job.communicate(timeout=300)
  assert job.returncode == 75, out[-5000:]
  stops = [line for line in out.splitlines() if "Stopped at step" in line]
  assert len(stops) == 2, out[-5000:]
  steps = {line.split("Stopped at step ")[1].split(" ")[0] for line in stops}
  assert len(steps) == 1, stops  # the same step on both processes
  step = int(steps.pop())
  from xception_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  assert workdir_lib.checkpoint_steps(tmp_path) == [step] and step < 400
