"""A run's folder is one run: its identity (the config it started with) and its lock.

Identity. The first run in a workdir records its config in `config.json`. A rerun in the same
workdir resumes that run, so before anything is written its config is compared with the
recorded one: every field must match except those that may change on resume (`RESUMABLE`: run
length, logging/eval/checkpoint frequency, where the data lives, device layout, ...). A changed
model, dataset, batch or optimizer is refused in one message listing each differing key with
its old and new value. A resume's config goes to `config.resume-<UTC time>.json` beside the
first one; `config.json` is never rewritten, so export always builds the model the weights were
trained as.

Lock. `lock.json` names the trainer that owns the workdir (host, pid, start time, a heartbeat
refreshed every `HEARTBEAT_SECONDS`). A second trainer is refused at once, naming the owner. A
lock whose owner is gone is taken over with a warning: on the same host, when its pid no longer
runs (or runs another program); elsewhere, when its heartbeat is older than `STALE_SECONDS`.
No POSIX flock, which NFS and object stores do not honour: a new lock file is created with
O_EXCL on local and NFS folders, and on object stores written, left to settle, and read back
(the last writer wins, and every contender sees who did). Process 0 holds the lock for all
processes of a multi-process run.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from absl import logging
import ml_collections

from xception_jax import paths

CONFIG_FILE = "config.json"
LOCK_FILE = "lock.json"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0
_SETTLE_SECONDS = 1.0  # object stores: time between writing the lock and reading it back

# Config fields that may differ between the first run and a resume (dotted names; a prefix
# ending in '.' covers a whole sub-config). Everything else defines the model, the data, the
# optimizer state or the training trajectory, and must match.
RESUMABLE = (
    "total_steps", "num_epochs", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "checkpoint_keep", "data_dir", "eval_batch_size", "best_metric", "init_from",
    "grad_accum_steps", "map_class_weighting", "mesh.", "input.num_parallel_calls",
    "input.cache", "input.bad_files",
)


class WorkdirError(ValueError):
  """The workdir cannot be used for this run (another run's, or locked); nothing was written."""


def checkpoint_steps(workdir: paths.PathLike) -> list[int]:
  """The finished checkpoint steps of a run, sorted; cheap (no orbax import).

  orbax writes a step under a temporary name and renames it to the bare step number when
  complete; on object stores, where nothing can be renamed, it writes into the step folder and
  marks it complete with commit_success.txt.
  """
  return finished_steps_in(paths.resolve(workdir) / "checkpoints")


def finished_steps_in(folder: paths.PathLike) -> list[int]:
  """The finished steps in a checkpoints folder (see checkpoint_steps)."""
  folder = paths.Path(folder)
  if not folder.is_dir():
    return []
  remote = paths.is_remote(folder)
  steps = []
  for entry in folder.iterdir():
    if entry.name.isdigit() and (not remote or (entry / "commit_success.txt").exists()):
      steps.append(int(entry.name))
  return sorted(steps)


# ----------------------------------------------------------------------------------------------
# Identity.
# ----------------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _normalise(value: Any) -> Any:
  """Command-line overrides arrive as strings ('4'); JSON turns tuples into lists."""
  if isinstance(value, str) and value.isdigit():
    return int(value)
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value


def _may_change(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def config_as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_differences(recorded: dict, config: dict) -> list[tuple[str, Any, Any]]:
  """(key, recorded value, new value) for each field that must match but does not.

  A model keyword argument set on one side only differs too (shown as "<unset>": the model's
  default applies there). Other fields present on one side only (a config key added or removed
  by a newer version of the code) cannot be compared and are skipped.
  """
  old, new = _flatten(recorded), _flatten(config)
  keys = (old.keys() & new.keys()) | {k for k in old.keys() ^ new.keys() if k.startswith("model.")}
  unset = "<unset>"
  return [(k, old.get(k, unset), new.get(k, unset)) for k in sorted(keys)
          if not _may_change(k) and _normalise(old.get(k, unset)) != _normalise(new.get(k, unset))]


def check_identity(workdir: paths.PathLike, config: ml_collections.ConfigDict) -> bool:
  """Refuses a config that differs from the workdir's recorded one; True if there is one.

  Reads only: nothing is written, whatever the outcome.
  """
  path = paths.resolve(workdir) / CONFIG_FILE
  if not path.exists():
    return False
  try:
    recorded = paths.read_json(path)
  except ValueError as e:
    raise WorkdirError(f"{e} It records the run this workdir holds; restore it or use a new "
                       "--workdir.") from None
  differences = config_differences(recorded, config_as_dict(config))
  if differences:
    listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in differences)
    raise WorkdirError(
        f"--workdir={workdir} holds a run with another config ({path}), so resuming it with "
        f"this one would mix two runs. Differing: {listed}. Use a new --workdir for the new "
        f"settings (add --config.init_from={workdir} to start from its weights), or rerun "
        f"with the recorded values to resume. Fields that may change on resume: "
        f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in RESUMABLE)}.")
  return True


def _show(value: Any) -> str:
  return value if value == "<unset>" else json.dumps(value)


def record_config(workdir: paths.PathLike, config: ml_collections.ConfigDict,
                  resumed: bool) -> paths.Path:
  """Writes config.json for a new run, or config.resume-<time>.json beside it for a resume."""
  workdir = paths.resolve(workdir)
  if resumed:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    path = workdir / f"config.resume-{stamp}.json"
  else:
    path = workdir / CONFIG_FILE
  paths.write_text(path, config.to_json_best_effort(indent=2))
  return path


# ----------------------------------------------------------------------------------------------
# Lock.
# ----------------------------------------------------------------------------------------------


def _process_start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it runs
  now_ticks = _process_start_ticks(pid)
  return start_ticks is None or now_ticks is None or now_ticks == start_ticks


def describe_owner(owner: dict) -> str:
  started = owner.get("start_time", "?")
  age = time.time() - float(owner.get("heartbeat", 0))
  return (f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {started}, "
          f"last heartbeat {age:.0f} s ago")


class WorkdirLock:
  """The workdir's lock file, held by process 0 of the run that trains in it."""

  def __init__(self, workdir: paths.PathLike, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS):
    self.path = paths.resolve(workdir) / LOCK_FILE
    self.heartbeat_seconds = heartbeat_seconds
    self.stale_seconds = stale_seconds
    self.lost = False
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    pid = os.getpid()
    self._record = {
        "host": socket.gethostname(), "pid": pid,
        "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "proc_start_ticks": _process_start_ticks(pid), "token": self._token,
        "command": " ".join(sys.argv)[:1000],
    }

  # --- Reading the current owner.

  def _read(self) -> dict | None:
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      owner = json.loads(text)
      return owner if isinstance(owner, dict) else {}
    except json.JSONDecodeError:
      return {}  # being written right now, or damaged

  def _stale_reason(self, owner: dict) -> str | None:
    """Why the owner is gone, or None when it may still be running."""
    if not owner:
      return "the lock file is unreadable"
    age = time.time() - float(owner.get("heartbeat", 0))
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
      if not _pid_alive(owner["pid"], owner.get("proc_start_ticks")):
        return f"process {owner['pid']} no longer runs on this host"
      return None
    if age > self.stale_seconds:
      return f"its heartbeat is {age:.0f} s old (stale after {self.stale_seconds:.0f} s)"
    return None

  # --- Taking and keeping it.

  def _write_mine(self) -> None:
    paths.write_text(self.path, json.dumps({**self._record, "heartbeat": time.time()}, indent=2))

  def _create(self) -> bool:
    """Creates the lock file if no other process did first; True when it is ours."""
    if paths.is_remote(self.path):
      self._write_mine()
      time.sleep(_SETTLE_SECONDS)
      return (self._read() or {}).get("token") == self._token
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump({**self._record, "heartbeat": time.time()}, f, indent=2)
    return True

  def _set_aside(self, owner: dict) -> None:
    """Moves a stale lock away; only one of several contenders manages it (locally)."""
    if paths.is_remote(self.path):
      return  # overwritten by _create; the read-back settles who won
    try:
      os.rename(os.fspath(self.path), f"{self.path}.stale-{owner.get('token', 'unknown')}")
    except FileNotFoundError:
      pass

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirError naming its live owner."""
    for attempt in range(5):
      owner = self._read()
      if owner == {} and attempt == 0:
        time.sleep(0.5)  # maybe half-written: look again before calling it stale
        owner = self._read()
      if owner is not None:
        reason = self._stale_reason(owner)
        if reason is None:
          raise WorkdirError(
              f"--workdir={self.path.parent} is in use by another trainer ({describe_owner(owner)}"
              f"; {self.path}). Wait for it to finish or stop it (it saves and exits on SIGTERM), "
              "or use another --workdir. If that process is dead on another host, the lock is "
              f"taken over once its heartbeat is {self.stale_seconds:.0f} s old.")
        logging.warning("Taking over the workdir lock %s of %s: %s.", self.path,
                        describe_owner(owner), reason)
        self._set_aside(owner)
      if self._create():
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return
    raise WorkdirError(f"Could not take the lock {self.path}: other trainers kept taking it.")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_seconds):
      try:
        if (self._read() or {}).get("token") != self._token:
          self.lost = True
          logging.error("The workdir lock %s was taken over by another trainer (%s); this run "
                        "stops at its next checkpoint.", self.path, describe_owner(self._read() or {}))
          return
        self._write_mine()
      except OSError as e:  # a transient storage error: try again at the next beat
        logging.warning("Could not refresh the workdir lock %s: %s", self.path, e)

  def check(self) -> None:
    """Raises WorkdirError when another trainer took the lock over (before writing a checkpoint)."""
    if self.lost:
      raise WorkdirError(f"Another trainer took over {self.path} while this run was training "
                         "(its heartbeat had stopped?); stopped without saving to avoid two "
                         "writers.")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      if (self._read() or {}).get("token") == self._token:
        self.path.unlink()
    except OSError as e:
      logging.warning("Could not remove the workdir lock %s: %s", self.path, e)
