"""Where training numbers go: console progress lines, TensorBoard events and metrics.jsonl.

One writer per run, active on process 0 only (the other processes of a multi-host run compute the
same replicated numbers). metrics.jsonl holds one JSON object per log or eval, each with a `step`
key, so plots and reports need nothing but the standard library to read a run. TensorBoard events
are framed with the tensorboard package's record writer into a file of `xception_jax.paths`, so
both files work in a gs:// workdir and nothing imports TensorFlow (tensorboard's EventFileWriter
goes through `tf.io.gfile`, which imports TensorFlow whenever it is installed).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
from typing import Mapping

from absl import logging
import jax
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from xception_jax import paths


_WRITER_IDS = itertools.count()  # two writers in one process and second get two event files


class MetricWriter:
  """Writes scalar metrics to the console, TensorBoard and `metrics.jsonl` in the workdir."""

  def __init__(self, workdir: str, total_steps: int, *, active: bool | None = None):
    self.active = jax.process_index() == 0 if active is None else active
    self.total_steps = total_steps
    self._start_time = time.time()
    self._start_step: int | None = None
    if self.active:
      workdir = paths.resolve(workdir)
      self._jsonl = paths.open_append(workdir / "metrics.jsonl")
      events_name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                     f"{os.getpid()}.{next(_WRITER_IDS)}")
      self._events_file = paths.open_append(
          paths.makedirs(workdir / "tensorboard") / events_name, binary=True)
      self._events = RecordWriter(self._events_file)
      self._add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` (names like 'train/loss', 'eval/ema_top1') at `step`."""
    if not self.active:
      return
    values = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
    self._add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    logging.info("%s", self._progress_line(step, values))

  def _add_event(self, event: event_pb2.Event) -> None:
    self._events.write(event.SerializeToString())
    self._events_file.flush()

  def _progress_line(self, step: int, values: Mapping[str, float]) -> str:
    if self._start_step is None:
      self._start_step, self._start_time = step, time.time()
    done = step - self._start_step
    elapsed = time.time() - self._start_time
    eta = ""
    if done > 0 and step < self.total_steps:
      remaining = elapsed / done * (self.total_steps - step)
      eta = f" ETA {_format_seconds(remaining)}"
    shown = " ".join(f"{k}={_format_value(v)}" for k, v in values.items())
    percent = 100.0 * step / max(self.total_steps, 1)
    return f"[step {step}/{self.total_steps} {percent:5.1f}%{eta}] {shown}"

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._events_file.close()


def _format_value(v: float) -> str:
  if math.isfinite(v) and v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
    return f"{v:.3e}"
  return f"{v:.4f}"


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
