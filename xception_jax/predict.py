"""Classify image files with an exported model: the top-k labels of each file, as text or JSON.

    python -m xception_jax.predict --model=EXPORT_DIR [--top-k=5] [--json] IMAGE...

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
Only numpy, PIL and jax are needed (no TensorFlow, no Flax): see `xception_jax.export.load`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import numpy as np

from xception_jax import export

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
      self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                        f"{self.label} ({rate:.1f}/s)")
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


def classify(predictor: export.Predictor, paths: Sequence[str], *, top_k: int = 5,
             batch_size: int = DEFAULT_BATCH_SIZE,
             progress: ProgressBar | None = None) -> list[dict[str, Any]]:
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
      except export.ImageError as e:
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m xception_jax.predict",
      description="Print the top-k labels of image files with a model exported by "
                  "`python -m xception_jax.export`.")
  parser.add_argument("--model", required=True, help="The export directory.")
  parser.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=5,
                      help="How many labels to print per image (default 5).")
  parser.add_argument("--json", action="store_true",
                      help="Print a JSON list, one {file, predictions, error} object per image.")
  parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                      default=DEFAULT_BATCH_SIZE, help="Images per call of the model.")
  parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                      help="Progress bar on stderr; auto = when there is more than one batch.")
  parser.add_argument("images", nargs="+", metavar="IMAGE", help="Image files (JPEG, PNG, ...).")
  args = parser.parse_args(argv)
  if args.top_k < 1:
    parser.error(f"--top-k={args.top_k} must be >= 1.")
  if args.batch_size < 1:
    parser.error(f"--batch-size={args.batch_size} must be >= 1.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    predictor = export.load(args.model, max_batch_size=args.batch_size)
  except export.ExportFormatError as e:
    print(f"error: --model: {e}", file=sys.stderr)
    return 2
  show = {"always": True, "never": False}.get(args.progress, len(args.images) > args.batch_size)
  progress = ProgressBar(len(args.images)) if show else None
  try:
    results = classify(predictor, args.images, top_k=args.top_k, batch_size=args.batch_size,
                       progress=progress)
  finally:
    if progress is not None:
      progress.close()
  if args.json:
    print(json.dumps(results, indent=2))
  else:
    print(format_text(results))
  failed = [r["file"] for r in results if r["error"] is not None]
  if failed:
    print(f"{len(failed)} of {len(results)} file(s) could not be classified: "
          f"{', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
