"""Command line for training: flags in, `train.train_and_evaluate(config, workdir)` out.

  python -m xception_jax.main --config=configs/quickstart.py --workdir=/tmp/xj
  python -m xception_jax.main --config=configs/imagenet.py:runlocal --workdir=/tmp/xj \
      --config.batch_size=64

`--config` takes a config file with an optional argument string after ':' and field overrides
`--config.key=value` (unknown keys are refused: the config is locked). Several processes (GPU
hosts, TPU workers, launch/local.sh) connect through --coordinator_address/--num_processes/
--process_id, or through JAX's own SLURM and Cloud TPU detection when those are not given.
"""

import logging as std_logging
import os
import re
import sys

# TensorFlow (used by the input pipeline only) is quiet unless asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from xception_jax import distributed
from xception_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/quickstart.py or configs/imagenet.py:runlocal.",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _keep_console_readable() -> None:
  """INFO lines from this package (progress, evals); only warnings from the libraries under it.

  orbax and tfds log every file they write at INFO; --verbosity=1 shows everything again.
  """
  if FLAGS["verbosity"].present:
    return

  def only_ours_below_warning(record) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
      return False  # orbax's orphaned write tasks after a failed save: a traceback each at exit
    if f"{os.sep}orbax{os.sep}" in record.pathname and (
      record.levelno >= std_logging.ERROR or "tracked_metric" in str(record.msg)
    ):
      # A failed asynchronous save is logged with its traceback by several orbax threads (about
      # 1,700 lines for a full disk); the same error reaches train.py, which reports it in one
      # line. "Requested `tracked_metric`" is every save without eval metrics: expected here.
      return False
    return (
      record.levelno >= std_logging.WARNING or f"{os.sep}xception_jax{os.sep}" in record.pathname
    )

  logging.get_absl_handler().addFilter(only_ours_below_warning)
  previous_hook = sys.excepthook

  def quiet_closed_loop(kind, value, traceback):
    # tensorstore completing a write of a failed save after orbax closed its event loop: not an
    # error of its own (the failure is reported), but printed with a traceback per write.
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      previous_hook(kind, value, traceback)

  sys.excepthook = quiet_closed_loop


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for a bad --config override."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # a config file that raised
      lines = [lines[0].rstrip(":"), lines[-1]]
    sys.exit(f"error: {' '.join(lines)}")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: {_describe_config_error(argv, e)}")


def _describe_config_error(argv: list[str], error: Exception) -> str:
  """'--config.batch_sise: no such config field (did you mean batch_size?)' and the like."""
  text = str(error).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
  unknown = re.match(r"'?([A-Za-z0-9_]+)'?\s*\n?Did you mean \"([^\"]+)\"", text)
  if unknown:
    key, suggestion = unknown.groups()
    for arg in argv[1:]:
      name = arg.split("=", 1)[0]
      if name.startswith("--config.") and name.split(".")[-1] == key:
        parent = name[len("--config.") :].rpartition(".")[0]
        close = f"{parent}.{suggestion}" if parent else suggestion
        return f"{name}: the config has no field {key!r} (did you mean --config.{close}?)."
  key = text.splitlines()[0].strip("'\"") if text else ""
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if key and name.startswith("--config.") and name.split(".")[-1] == key:
      parent = name[len("--config.") :].rpartition(".")[0]
      return (
        f"{name}: the config has no field {key!r}"
        f"{f' under {parent}' if parent else ''}; valid fields are listed in the config file."
      )
  first = text.splitlines()[0] if text else type(error).__name__
  return f"--config: {first}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _keep_console_readable()
  host_memory.keep_freed_host_memory()  # before JAX starts its CPU client (see the module)
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from xception_jax import preemption  # pylint: disable=g-import-not-at-top  (after initialize)
  from xception_jax import train  # pylint: disable=g-import-not-at-top

  try:
    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.RUN_ERRORS as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  if result["preempted"]:
    sys.exit(preemption.PREEMPTED_EXIT_STATUS)  # saved, resumable: rerun the same command


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
