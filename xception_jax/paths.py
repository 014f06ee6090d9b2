"""Workdir paths: local folders and cloud storage (`gs://bucket/run`) through one small layer.

Every file that training, export, predict, the report and the sweep read or write under a run's
folder goes through here, so `--workdir=gs://bucket/run` (the usual Cloud TPU set-up) means the
bucket and never a local `./gs:/bucket` folder. Paths are `etils.epath.Path` objects (installed
with orbax, which takes them for checkpoints as they are): local paths use the os module, `gs://`
uses TensorFlow's gfile when TensorFlow is installed and fsspec/gcsfs otherwise (etils' own choice;
`EPATH_USE_TF=false` forces gcsfs). Model and step code never import anything through this.

Cloud objects cannot be appended to or renamed atomically, so:
  * `write_text` writes to a temporary file and renames it on a local disk (a crash never leaves
    half a JSON file); an object store's single upload is atomic by itself.
  * `open_append` returns a real append-mode file locally; remotely it keeps the file's content in
    memory and rewrites the object when flushed (at most every `min_upload_interval` seconds,
    and on close), which is cheap for the small logs written this way.
"""
from __future__ import annotations

import io
import json
import os
import time
import uuid
from typing import Any

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URLs such as gs://bucket/dir (anything with a scheme), False for local paths."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """A local path made absolute (`~` expanded), or a cloud URL kept as it is."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text.rstrip("/"))
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text()


def read_json(path: PathLike) -> Any:
  """The parsed JSON file; ValueError naming the file when it is not valid JSON."""
  text = read_text(path)
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from e


def write_text(path: PathLike, text: str) -> None:
  """Writes the whole file at once: a reader sees the old content or the new, never half."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: PathLike, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2) + "\n")


def makedirs(path: PathLike) -> epath.Path:
  path = epath.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  return path


def open_append(path: PathLike, *, binary: bool = False,
                min_upload_interval: float = 30.0) -> Any:
  """A file opened for appending, local or remote (see the module docstring)."""
  if not is_remote(path):
    return open(os.fspath(path), "ab" if binary else "a")
  return _RewritingAppendFile(epath.Path(path), binary, min_upload_interval)


class _RewritingAppendFile:
  """Append semantics on an object store: the content is kept and the object rewritten."""

  def __init__(self, path: epath.Path, binary: bool, min_upload_interval: float):
    self.name = os.fspath(path)
    self._path = path
    self._binary = binary
    self._min_interval = min_upload_interval
    self._buffer = io.BytesIO()
    if path.exists():
      self._buffer.write(path.read_bytes())
    self._dirty = False
    self._last_upload = 0.0

  def write(self, data) -> int:
    self._buffer.write(data if self._binary else data.encode("utf-8"))
    self._dirty = True
    return len(data)

  def flush(self, force: bool = False) -> None:
    if self._dirty and (force or time.time() - self._last_upload >= self._min_interval):
      self._path.write_bytes(self._buffer.getvalue())
      self._dirty, self._last_upload = False, time.time()

  def close(self) -> None:
    self.flush(force=True)
