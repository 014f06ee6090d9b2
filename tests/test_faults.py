"""Never lose or corrupt a run: workdir identity and lock, the best checkpoint, export during
checkpoint churn, preemption, cloud (gs://) workdirs, write errors, and short error messages.

The launchers' side of preemption (exit status 75 through launch/local.sh, SLURM requeue, two
processes stopping at the same step) is in tests/test_launch.py. Slow tests here (they train):
best kept across a real resume, a run/resume/export on gs://, and disk full on a real tmpfs (root
only): `python -m pytest -q -m slow tests/test_faults.py`.
"""

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from configs import spectrum
from xception_jax import checkpointing
from xception_jax import evaluation
from xception_jax import export
from xception_jax import models
from xception_jax import paths
from xception_jax import serving
from xception_jax import train
from xception_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(get_config=quickstart.get_config, arg="runlocal", **overrides):
  """xception_tiny at 72 px on synthetic data (no TensorFlow, no files to read)."""
  c = get_config(arg)
  c.unlock()
  c.dataset = "synthetic"
  c.num_classes = 10
  c.image_size = 72
  c.batch_size = 8
  c.eval_batch_size = 1000
  c.total_steps = 2
  c.log_every_steps = 1
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  for k, v in overrides.items():
    c[k] = v
  return c


def _listing(folder):
  return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------------
# 1. Workdir identity.
# ------------------------------------------------------------------------------------------------


def test_changed_model_setting_is_refused_before_anything_is_written(tmp_path):
  first = tiny_config(spectrum.get_config, "runlocal")
  workdir_lib.record_config(tmp_path, first, resumed=False)
  recorded = (tmp_path / "config.json").read_bytes()

  changed = tiny_config(spectrum.get_config, "runlocal,mid_activation=relu")
  with pytest.raises(workdir_lib.WorkdirError) as error:
    train.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  assert 'model.mid_activation: "none" -> "relu"' in message
  assert f"--config.init_from={tmp_path}" in message and "new --workdir" in message
  assert "\n" not in message
  assert (tmp_path / "config.json").read_bytes() == recorded
  assert _listing(tmp_path) == ["config.json"]  # no lock, no checkpoints, no metrics


def test_allowed_changes_resume_and_keep_each_config(tmp_path):
  first = tiny_config()
  workdir_lib.record_config(tmp_path, first, resumed=False)
  recorded = (tmp_path / "config.json").read_bytes()
  longer = tiny_config(total_steps=50, log_every_steps=7, checkpoint_keep=1, data_dir="/elsewhere")
  longer.mesh.data = 4
  assert workdir_lib.check_identity(tmp_path, longer)  # a resume, not refused
  workdir_lib.record_config(tmp_path, longer, resumed=True)
  assert (tmp_path / "config.json").read_bytes() == recorded
  resumes = [n for n in _listing(tmp_path) if n.startswith("config.resume-")]
  assert len(resumes) == 1
  assert json.loads((tmp_path / resumes[0]).read_text())["total_steps"] == 50

  assert workdir_lib.config_differences(
    workdir_lib.config_as_dict(first),
    workdir_lib.config_as_dict(tiny_config(batch_size=16, seed=3)),
  ) == [("batch_size", 8, 16), ("seed", 0, 3)]
  with_segments = tiny_config()
  with_segments.model.segments = "4"  # set only now: a model argument that differs
  assert workdir_lib.config_differences(
    workdir_lib.config_as_dict(first), workdir_lib.config_as_dict(with_segments)
  ) == [("model.segments", "<unset>", "4")]


# ------------------------------------------------------------------------------------------------
# 2. The workdir lock.
# ------------------------------------------------------------------------------------------------


def _write_lock(folder, **fields):
  owner = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start_time": "2026-01-01T00:00:00",
    "heartbeat": time.time(),
    "token": "someone-else",
  }
  owner.update(fields)
  (folder / workdir_lib.LOCK_FILE).write_text(json.dumps(owner))
  return owner


def test_live_owner_is_refused_at_once_naming_it(tmp_path):
  _write_lock(tmp_path)  # this very process: alive
  start = time.time()
  with pytest.raises(workdir_lib.WorkdirError) as error:
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert time.time() - start < 30  # before any compile
  message = str(error.value)
  assert f"host {socket.gethostname()}, pid {os.getpid()}, started 2026-01-01T00:00:00" in message
  assert json.loads((tmp_path / "lock.json").read_text())["token"] == "someone-else"
  assert not (tmp_path / "config.json").exists()

  first = workdir_lib.WorkdirLock(tmp_path / "other")
  os.makedirs(tmp_path / "other")
  first.acquire()
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another trainer"):
    workdir_lib.WorkdirLock(tmp_path / "other").acquire()
  first.release()
  assert not (tmp_path / "other" / "lock.json").exists()


def test_dead_or_silent_owner_is_taken_over(tmp_path, caplog):
  finished = subprocess.Popen([sys.executable, "-c", "pass"])
  finished.wait()
  _write_lock(tmp_path, pid=finished.pid)
  lock = workdir_lib.WorkdirLock(tmp_path)
  lock.acquire()
  assert "no longer runs on this host" in caplog.text
  mine = json.loads((tmp_path / "lock.json").read_text())
  assert mine["pid"] == os.getpid() and mine["token"] != "someone-else"
  lock.release()

  # Another host: judged by its heartbeat.
  _write_lock(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 30)
  with pytest.raises(workdir_lib.WorkdirError, match="host node-elsewhere, pid 1"):
    workdir_lib.WorkdirLock(tmp_path, stale_seconds=600).acquire()
  _write_lock(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 3600)
  lock = workdir_lib.WorkdirLock(tmp_path, stale_seconds=600, heartbeat_seconds=0.05)
  lock.acquire()
  assert "heartbeat is 3600 s old" in caplog.text
  before = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
  time.sleep(0.3)
  assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > before  # it beats
  _write_lock(tmp_path, token="a-third-trainer")  # taken over while it ran
  time.sleep(0.3)
  with pytest.raises(workdir_lib.WorkdirError, match="took over"):
    lock.check()
  lock.release()
  assert json.loads((tmp_path / "lock.json").read_text())["token"] == "a-third-trainer"


# ------------------------------------------------------------------------------------------------
# 3. The best checkpoint, kept across a resume and exported.
# ------------------------------------------------------------------------------------------------


def test_best_checkpoint_survives_a_new_manager_and_exports(tmp_path):
  """Fast (no training): saves with eval metrics through two managers, as a run and its resume
  do, with checkpoint_keep=1; export --checkpoint=best then picks the early best step."""
  import types  # pylint: disable=g-import-not-at-top

  from xception_jax import data  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  model = models.create_model(config, 10)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
    jax.ShapeDtypeStruct((1, 72, 72, 3), jnp.float32),
  )
  variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
  state = {
    "step": np.int32(0),
    "params": variables["params"],
    "batch_stats": variables["batch_stats"],
    "ema_params": variables["params"],
    "ema_batch_stats": variables["batch_stats"],
  }
  scores = {2: 0.9, 4: 0.5, 6: 0.4}
  for steps in ((2, 4), (6,)):  # the first run, then its resume
    manager = checkpointing.create_manager(tmp_path, keep=1, best_metric="eval/ema_top1")
    for step in steps:
      checkpointing.save(
        manager,
        step,
        {**state, "step": np.int32(step)},
        {"eval/ema_top1": scores[step], "eval/ema_loss": 1 - scores[step]},
      )
    manager.wait_until_finished()
    manager.close()
  assert workdir_lib.checkpoint_steps(tmp_path) == [2, 6]  # step 4 went, the best stayed
  workdir_lib.record_config(tmp_path, config, resumed=False)
  info = data.DatasetInfo(
    name="synthetic",
    num_classes=10,
    num_train_examples=100,
    num_eval_examples=10,
    multi_label=False,
    class_names=None,
  )
  train._write_run_info(
    tmp_path,
    config,
    info,
    model,  # pylint: disable=protected-access
    types.SimpleNamespace(params=state["params"], batch_stats=state["batch_stats"]),
    per_epoch=1.0,
    num_steps=6,
    loss_kind="softmax",
  )
  out = tmp_path / "export"
  assert (
    export.main([f"--workdir={tmp_path}", f"--out={out}", "--checkpoint=best", "--saved_model=no"])
    == 0
  )
  metadata = json.loads((out / "export.json").read_text())
  assert metadata["source"]["step"] == 2 and metadata["source"]["checkpoint"] == "best"
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # readable by others, not 0700
  assert checkpointing.read_state(tmp_path, "best", best_metric="eval/ema_loss")[1] == 2  # min
  with pytest.raises(
    checkpointing.CheckpointError, match=r"No checkpoint step 4 in .*available steps: \[2, 6\]"
  ):
    checkpointing.read_state(tmp_path, 4)


@pytest.mark.slow
def test_best_checkpoint_survives_a_resume_and_exports(tmp_path, monkeypatch):
  scores = {2: 0.9, 4: 0.5, 6: 0.4}  # the best eval comes first

  def scripted_evaluate(eval_step, state, config, info, sharding):
    step = int(jax.device_get(state.step))
    return {
      name: (1.0 - scores[step] if name.endswith("loss") else scores[step])
      for name in evaluation.eval_metric_names(info.multi_label)
    }

  monkeypatch.setattr(train, "evaluate", scripted_evaluate)
  workdir = tmp_path / "run"
  train.train_and_evaluate(
    tiny_config(total_steps=4, eval_every_steps=2, checkpoint_keep=1), str(workdir)
  )
  assert workdir_lib.checkpoint_steps(workdir) == [2, 4]
  metrics = json.loads((workdir / "checkpoints" / "2" / "metrics" / "metrics").read_text())
  assert metrics["eval/ema_top1"] == 0.9  # orbax now writes the metrics with each checkpoint

  result = train.train_and_evaluate(
    tiny_config(total_steps=6, eval_every_steps=2, checkpoint_keep=1), str(workdir)
  )
  assert result["step"] == 6
  assert workdir_lib.checkpoint_steps(workdir) == [2, 6]  # step 4 went, the best stayed
  assert any(n.startswith("config.resume-") for n in _listing(workdir))
  assert json.loads((workdir / "run.json").read_text())["best_metric"] == "eval/ema_top1"

  out = tmp_path / "export"
  assert (
    export.main([f"--workdir={workdir}", f"--out={out}", "--checkpoint=best", "--saved_model=no"])
    == 0
  )
  metadata = json.loads((out / "export.json").read_text())
  assert metadata["source"]["step"] == 2 and metadata["source"]["checkpoint"] == "best"
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

  with pytest.raises(
    checkpointing.CheckpointError, match=r"No checkpoint step 4 in .*available steps: \[2, 6\]"
  ):
    checkpointing.read_state(workdir, 4)
  assert checkpointing.read_state(workdir, "latest")[1] == 6


# ------------------------------------------------------------------------------------------------
# 4. Reading checkpoints while a run writes and deletes them.
# ------------------------------------------------------------------------------------------------


def test_reads_during_checkpoint_churn_return_complete_checkpoints(tmp_path):
  """A trainer keeping 1 checkpoint deletes the one export is reading; export picks again."""
  manager = checkpointing.create_manager(tmp_path, keep=1, best_metric="eval/ema_top1")
  saved = threading.Event()
  done = threading.Event()

  def train_like():
    try:
      for step in range(1, 61):
        checkpointing.save(
          manager, step, {"w": jnp.full((128, 128), float(step)), "step": jnp.asarray(step)}
        )
        saved.set()
        time.sleep(0.01)
      manager.wait_until_finished()
    finally:
      done.set()

  writer = threading.Thread(target=train_like)
  writer.start()
  saved.wait(60)
  reads = []
  while not done.is_set():
    try:
      tree, step = checkpointing.read_state(tmp_path)
    except checkpointing.CheckpointError as e:
      assert "yet" in str(e) and "\n" not in str(e)  # only before the first save completes
      continue
    assert int(tree["step"]) == step and np.all(tree["w"] == step)  # complete and consistent
    reads.append(step)
  writer.join()
  manager.close()
  assert len(reads) >= 3 and reads == sorted(reads), reads
  assert checkpointing.read_state(tmp_path)[1] == 60


def test_missing_checkpoints_are_one_line_errors(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoint in .* yet"):
    checkpointing.read_state(tmp_path)
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoints at"):
    checkpointing.read_state(tmp_path / "nowhere")


def test_a_damaged_checkpoint_is_a_one_line_error_naming_the_step(tmp_path):
  """Not mistaken for a deletion in progress: still listed and complete after the waits."""
  manager = checkpointing.create_manager(tmp_path, keep=1, best_metric="eval/ema_top1")
  checkpointing.save(manager, 3, {"w": jnp.ones((4,)), "step": jnp.asarray(3)})
  manager.wait_until_finished()
  manager.close()
  (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").unlink()
  with pytest.raises(checkpointing.CheckpointError, match="Cannot read checkpoint step 3 in") as e:
    checkpointing.read_state(tmp_path)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# 5. Preemption: the exit status (launchers and two processes: tests/test_launch.py).
# ------------------------------------------------------------------------------------------------


def test_a_preempted_run_exits_with_the_resumable_status(tmp_path):
  """main exits 75 when the run stopped for preemption, 0 when it finished (train stubbed)."""
  from xception_jax import preemption  # pylint: disable=g-import-not-at-top

  assert preemption.PREEMPTED_EXIT_STATUS == 75
  for preempted, status in ((True, 75), (False, 0)):
    stub = (
      f"import sys; from xception_jax import train; "
      f"train.train_and_evaluate = lambda c, w: {{'step': 3, 'preempted': {preempted}}}; "
      f"from xception_jax import main; from absl import app; "
      f"sys.argv = ['main', '--config=configs/quickstart.py', '--workdir={tmp_path}']; "
      f"app.run(main.main, flags_parser=main.parse_flags)"
    )
    result = subprocess.run(
      [sys.executable, "-c", stub],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == status, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# 6. gs:// workdirs, through a GCS emulator on localhost.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs_emulator():
  """gcp-storage-emulator (in memory; tests/gcs_emulator.py) on a free localhost port, with the
  clients pointed at it."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  env = {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs
    "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array writes
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
    "FSSPEC_GS_TOKEN": "anon",
    "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup
    "EPATH_USE_TF": "false",  # epath -> fsspec/gcsfs (TF's gfile does not know the emulator)
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe
  }
  previous = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  (reads EPATH_USE_TF once)
  server = subprocess.Popen(
    [
      sys.executable,
      os.path.join(REPO, "tests", "gcs_emulator.py"),
      "start",
      "--host=127.0.0.1",
      f"--port={port}",
      "--in-memory",
      "--default-bucket=xj-test",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    deadline = time.time() + 30
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          pytest.fail("the GCS emulator did not start")
        time.sleep(0.2)
    yield "gs://xj-test"
  finally:
    server.terminate()
    server.wait(10)
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


def test_gs_workdir_layers(gcs_emulator):
  """Every workdir file on gs:// (fast: no training): records, lock, checkpoints, metrics."""
  from xception_jax import metric_writer  # pylint: disable=g-import-not-at-top

  workdir = f"{gcs_emulator}/layers"
  remote = paths.makedirs(workdir)
  config = tiny_config()
  workdir_lib.record_config(workdir, config, resumed=False)
  assert workdir_lib.check_identity(workdir, tiny_config(total_steps=9))
  with pytest.raises(workdir_lib.WorkdirError, match="seed: 0 -> 1"):
    workdir_lib.check_identity(workdir, tiny_config(seed=1))

  lock = workdir_lib.WorkdirLock(workdir)
  lock.acquire()  # written, settled, read back
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another trainer"):
    workdir_lib.WorkdirLock(workdir).acquire()
  lock.release()
  assert not (remote / "lock.json").exists()

  for attempt in range(2):  # a resume appends to metrics.jsonl (rewritten: objects are immutable)
    writer = metric_writer.MetricWriter(workdir, 10, active=True)
    writer.write(attempt + 1, {"train/loss": 1.0 / (attempt + 1)})
    writer.close()
  lines = (remote / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  assert len(list((remote / "tensorboard").iterdir())) == 2

  for _first, steps in ((1, (1, 2)), (3, (3,))):  # a second manager = a resumed run
    manager = checkpointing.create_manager(workdir, keep=1, best_metric="eval/ema_top1")
    for step in steps:
      checkpointing.save(
        manager,
        step,
        {"w": jnp.full((4,), float(step))},
        {"eval/ema_top1": {1: 0.9, 2: 0.5, 3: 0.4}[step]},
      )
    manager.wait_until_finished()
    manager.close()
  assert workdir_lib.checkpoint_steps(workdir) == [1, 3]  # the best survived the resume
  tree, step = checkpointing.read_state(workdir, "best", best_metric="eval/ema_top1")
  assert step == 1 and np.all(tree["w"] == 1.0)
  assert not os.path.exists("gs:")  # nothing went to a local ./gs:/ folder


@pytest.mark.slow
def test_gs_workdir_run_resume_and_export(gcs_emulator, tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
    "launch_sweep", os.path.join(REPO, "launch", "sweep.py")
  )
  sweep = importlib.util.module_from_spec(spec)
  sys.modules.setdefault(spec.name, sweep)
  spec.loader.exec_module(sweep)
  from xception_jax.tools import runs  # pylint: disable=g-import-not-at-top

  workdir = f"{gcs_emulator}/runs/a"
  first = train.train_and_evaluate(
    tiny_config(total_steps=2, checkpoint_every_steps=1, checkpoint_keep=1), workdir
  )
  assert first["step"] == 2
  assert not os.path.exists("gs:")  # nothing went to a local ./gs:/ folder
  remote = paths.resolve(workdir)
  names = {p.name for p in remote.iterdir()}
  assert {"config.json", "run.json", "metrics.jsonl", "checkpoints", "tensorboard"} <= names
  assert "lock.json" not in names  # released
  assert workdir_lib.checkpoint_steps(workdir) == [2]

  second = train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_keep=1), workdir)
  assert second["step"] == 3 and not second["preempted"]
  records = [json.loads(line) for line in (remote / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]  # appended on resume
  assert any(p.name.startswith("config.resume-") for p in remote.iterdir())
  assert sweep.run_status(workdir).state == "finished"
  assert runs.find_runs(f"{gcs_emulator}/runs") == [workdir]

  out = f"{gcs_emulator}/exports/a"
  assert export.main([f"--workdir={workdir}", f"--out={out}", "--saved_model=no"]) == 0
  predictor = serving.load(out)
  assert predictor.metadata["source"]["step"] == 3
  probabilities = predictor.predict([np.zeros((40, 50, 3), np.uint8)])
  assert probabilities.shape == (1, 10)

  with pytest.raises(workdir_lib.WorkdirError, match="batch_size: 8 -> 16"):
    train.train_and_evaluate(tiny_config(total_steps=3, batch_size=16), workdir)


# ------------------------------------------------------------------------------------------------
# 7. Disk full and other write errors.
# ------------------------------------------------------------------------------------------------


def test_write_errors_become_one_line_naming_path_cause_and_intact_checkpoint(tmp_path):
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  workdir = paths.resolve(tmp_path)
  full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
  error = train._as_write_error(full, workdir)
  assert str(error) == (
    f"Writing to {tmp_path} failed: No space left on device ({tmp_path}/metrics.jsonl). The "
    f"last complete checkpoint, step 2 in {tmp_path}/checkpoints, is intact; free space (or "
    "fix the storage) and rerun the same command to resume."
  )

  # What orbax raises from its save thread: tensorstore's status text in a ValueError chain.
  try:
    try:
      raise ValueError(
        'UNKNOWN: Error writing local file "/w/checkpoints/4.orbax-checkpoint-tmp/state/d/x": '
        "[OS error 28: No space left on device] [source locations='tensorstore/...']"
      )
    except ValueError as inner:
      raise RuntimeError("async save failed") from inner
  except RuntimeError as wrapped:
    error = train._as_write_error(wrapped, workdir)
  assert "No space left on device" in str(error) and "4.orbax-checkpoint-tmp" in str(error)
  assert "step 2" in str(error) and "\n" not in str(error)
  assert train._as_write_error(ValueError("a shape mismatch"), workdir) is None


def _mount_tmpfs(folder, size):
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  folder.mkdir()
  result = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
    capture_output=True,
    text=True,
  )
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(tmp_path):
  """A real full disk: one clear error, the last good checkpoint named and readable."""
  disk = tmp_path / "disk"
  _mount_tmpfs(disk, "6m")  # an xception_tiny checkpoint is ~2.3 MB: the third save fails
  try:
    workdir = disk / "run"
    args = [
      "--config=configs/quickstart.py:runlocal",
      "--config.dataset=synthetic",
      "--config.num_classes=10",
      "--config.image_size=72",
      "--config.batch_size=8",
      "--config.eval_batch_size=1000",
      "--config.total_steps=8",
      "--config.checkpoint_every_steps=2",
      "--config.checkpoint_keep=10",
      "--config.eval_every_steps=1000",
      f"--workdir={workdir}",
    ]
    result = subprocess.run(
      [sys.executable, "-m", "xception_jax.main", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: Writing to {workdir} failed: "), result.stderr[-3000:]
    assert "No space left on device" in last and "is intact" in last
    intact = workdir_lib.checkpoint_steps(workdir)
    assert intact and f"step {intact[-1]} in {workdir}/checkpoints" in last
    assert checkpointing.read_state(workdir)[1] == intact[-1]
    assert result.stderr.count("Traceback") == 0, result.stderr[-5000:]
    assert len(result.stderr.splitlines()) < 40, result.stderr
  finally:
    subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------
# 8. Short errors where tracebacks were.
# ------------------------------------------------------------------------------------------------


def test_unknown_config_key_is_one_line_with_the_close_match(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "xception_jax.main",
      "--config=configs/quickstart.py",
      f"--workdir={tmp_path}",
      "--config.lr.bsae=0.1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": REPO},
  )
  assert result.returncode == 1
  assert result.stderr.strip() == (
    "error: --config.lr.bsae: the config has no field 'bsae' (did you mean --config.lr.base?)."
  )


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--batch=0", "--batch=0 must be >= 1"),
    ("--steps=0", "--steps=0 must be >= 1"),
    ("--image_size=10", "--image_size=10: xception_tiny needs >= 71"),
    ("--model=nope", "--model='nope'; valid: inception_v3"),
    ("--segments=3", "--segments=3: Invalid segment setting: segments=3 does not divide"),
    ("--peak_tflops=-1", "--peak_tflops=-1.0 must be > 0"),
  ],
)
def test_benchmark_flags_are_checked_naming_the_flag(flag, message, capsys):
  from xception_jax.tools import benchmark  # pylint: disable=g-import-not-at-top

  argv = ["--model=xception_tiny", flag] if not flag.startswith("--model") else [flag]
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(argv)
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert message in last and "config." not in last


def test_model_info_bad_flags_are_one_line(tmp_path, capsys):
  from xception_jax.tools import model_info  # pylint: disable=g-import-not-at-top

  assert model_info.main(["--fc_layers=a,b"]) == 2
  assert capsys.readouterr().err.strip() == (
    "error: --fc_layers='a,b': comma-separated positive widths, e.g. 4096,4096"
  )
  csv = tmp_path / "missing" / "sweep.csv"
  assert model_info.main(["--sweep_segments", f"--csv={csv}"]) == 2
  assert capsys.readouterr().err.strip() == (
    f"error: --csv={csv}: the folder {tmp_path}/missing does not exist"
  )


def test_nan_message_when_no_checkpoint_exists_yet():
  class State:
    nonfinite_steps = jnp.asarray(1)

  with pytest.raises(train.NonFiniteLossError, match="no checkpoint had been written yet"):
    train._check_finite(State(), 3, None)
  with pytest.raises(train.NonFiniteLossError, match=r"last good checkpoint \(step 2\) is intact"):
    train._check_finite(State(), 3, 2)


def test_best_metric_is_validated_per_task():
  assert evaluation.resolve_best_metric(tiny_config(), multi_label=False) == "eval/ema_top1"
  assert evaluation.resolve_best_metric(tiny_config(), multi_label=True) == "eval/ema_map100"
  assert evaluation.resolve_best_metric(tiny_config(best_metric="eval/loss"), False) == "eval/loss"
  assert checkpointing.best_mode("eval/loss") == "min"
  with pytest.raises(ValueError, match=r"config.best_metric='eval/ema_top1'.*multi-label"):
    evaluation.resolve_best_metric(tiny_config(best_metric="eval/ema_top1"), multi_label=True)
