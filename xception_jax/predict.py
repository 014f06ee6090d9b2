"""Classify image files with an exported model: the top-k labels of each file, as text or JSON.

    python -m xception_jax.predict --model=EXPORT_DIR [--top_k=5] [--json] IMAGE...

Each file is read and preprocessed on its own, so one missing, truncated or non-image file is
reported (with its reason) while every other file is still classified; the exit status is then 1.
Readable files are batched through the exported function. With more files than one batch, a
progress bar is drawn on stderr (stdout carries only the results, so it can be piped).

With --json, stdout is one JSON list with an object per input file, in input order:
  {"file": "cat.jpg", "predictions": [{"label": "tabby", "score": 0.93, "index": 281}, ...],
   "error": null}
and for a file that failed: {"file": ..., "predictions": [], "error": "file not found"}.
`index` is the class index (also the label when the export has no class names).

Exit status: 0 all files classified; 1 some files failed; 2 bad arguments or an unusable export.
Only numpy, PIL and jax are needed (no TensorFlow, no Flax): see `xception_jax.serving`.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import sys
import time
from typing import Any
from typing import TextIO

from absl import flags
import numpy as np

from xception_jax import cli
from xception_jax import serving

DEFAULT_BATCH_SIZE = 32


class ProgressBar:
  """A one-line progress bar on a terminal; a line every 10% when the stream is not one."""

  def __init__(self, total: int, stream: TextIO | None = None, label: str = "files"):
    self.total = max(int(total), 1)
    self.stream = stream if stream is not None else sys.stderr  # looked up now: may be redirected
    self.label = label
    self.done = 0
    self.start = time.monotonic()
    self.interactive = bool(getattr(stream, "isatty", lambda: False)())
    self._last_decile = -1

  def update(self, count: int) -> None:
    self.done = min(self.done + int(count), self.total)
    rate = self.done / max(time.monotonic() - self.start, 1e-9)
    if self.interactive:
      filled = int(30 * self.done / self.total)
      self.stream.write(
        f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
        f"{self.label} ({rate:.1f}/s)"
      )
    else:
      decile = 10 * self.done // self.total
      if decile == self._last_decile:
        return
      self._last_decile = decile
      self.stream.write(f"{self.done}/{self.total} {self.label} ({rate:.1f}/s)\n")
    self.stream.flush()

  def close(self) -> None:
    if self.interactive:
      self.stream.write("\n")
      self.stream.flush()


def classify(
  predictor: serving.Predictor,
  paths: Sequence[str],
  *,
  top_k: int = 5,
  batch_size: int = DEFAULT_BATCH_SIZE,
  progress: ProgressBar | None = None,
) -> list[dict[str, Any]]:
  """Top-k predictions per file; unreadable files get an error instead, the others still run.

  Returns one {'file', 'predictions': [{'label', 'score', 'index'}], 'error'} per path, in order.
  """
  if top_k < 1:
    raise ValueError(f"top_k={top_k} must be >= 1.")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1.")
  results = [{"file": path, "predictions": [], "error": None} for path in paths]
  for start in range(0, len(paths), batch_size):
    rows, images = [], []
    for row in range(start, min(start + batch_size, len(paths))):
      try:
        images.append(predictor.preprocess(paths[row]))
        rows.append(row)
      except serving.ImageError as e:
        results[row]["error"] = e.reason
    if images:
      probabilities = predictor.predict_preprocessed(np.stack(images))
      for row, best in zip(rows, predictor.top_k(probabilities, top_k)):
        results[row]["predictions"] = best
    if progress is not None:
      progress.update(min(batch_size, len(paths) - start))
  return results


def format_text(results: Sequence[dict[str, Any]]) -> str:
  """The human-readable listing: each file, then its scores and labels (or its error)."""
  lines = []
  for result in results:
    lines.append(result["file"])
    if result["error"] is not None:
      lines.append(f"  error: {result['error']}")
    for prediction in result["predictions"]:
      lines.append(f"  {prediction['score']:.4f}  {prediction['label']}")
  return "\n".join(lines)


PROG = "python -m xception_jax.predict"
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "model", None, "The export directory (python -m xception_jax.export).", flag_values=FLAGS
)
flags.DEFINE_integer("top_k", 5, "How many labels to print per image.", flag_values=FLAGS)
flags.DEFINE_bool(
  "json",
  False,
  "Print a JSON list, one {file, predictions, error} object per image.",
  flag_values=FLAGS,
)
flags.DEFINE_integer(
  "batch_size", DEFAULT_BATCH_SIZE, "Images per call of the model.", flag_values=FLAGS
)
flags.DEFINE_enum(
  "progress",
  "auto",
  ["auto", "always", "never"],
  "Progress bar on stderr; auto = when there is more than one batch.",
  flag_values=FLAGS,
)


def parse_args(argv: Sequence[str] | None) -> list[str]:
  """Parses and checks the flags into FLAGS; returns the image files (the positional args)."""
  images = cli.parse(FLAGS, argv, PROG, __doc__.split("\n\n")[0], positional="IMAGE...")
  if FLAGS.model is None:
    cli.usage_error(PROG, "--model (the export directory) is required.")
  if not images:
    cli.usage_error(PROG, "give at least one image file after the flags.")
  if FLAGS.top_k < 1:
    cli.usage_error(PROG, f"--top_k={FLAGS.top_k} must be >= 1.")
  if FLAGS.batch_size < 1:
    cli.usage_error(PROG, f"--batch_size={FLAGS.batch_size} must be >= 1.")
  return images


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (see the module docstring)."""
  images = parse_args(argv)
  try:
    predictor = serving.load(FLAGS.model, max_batch_size=FLAGS.batch_size)
  except serving.ExportFormatError as e:
    print(f"error: --model: {e}", file=sys.stderr)
    return 2
  show = {"always": True, "never": False}.get(FLAGS.progress, len(images) > FLAGS.batch_size)
  progress = ProgressBar(len(images)) if show else None
  try:
    results = classify(
      predictor, images, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size, progress=progress
    )
  finally:
    if progress is not None:
      progress.close()
  if FLAGS.json:
    print(json.dumps(results, indent=2))
  else:
    print(format_text(results))
  failed = [r["file"] for r in results if r["error"] is not None]
  if failed:
    print(
      f"{len(failed)} of {len(results)} file(s) could not be classified: "
      f"{', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
