"""Several benchmark configurations in one process, each result appended as it is measured.

  python bench/run_points.py --jsonl-out=F --tag=spectrum \\
      --common="--model=xception --budget=params --mode=train --batch=128 --dtype=bfloat16" \\
      --segments=depthwise --segments=1 --segments=64:grouped=rewritten ...
  python bench/run_points.py --jsonl-out=F --tag=x "--segments=4 --conv-formulation=native" ...

Why: a GPU session has minutes, and the spectrum is 15 compiled training steps; starting JAX,
its CUDA client and our imports once instead of 15 times saves about a minute. Each point is
`python -m xception_jax.tools.benchmark` with `--common` + the point's own flags, run through the
same `run_benchmark`; its result (or its error) is one JSON line with `tag`, `point` and
`points_before` added, written and flushed before the next point starts, so a stage stopped by
its timeout keeps every point it finished. Caveat: the device's peak memory is the process's, so
after the first point it is the largest of all points so far (`points_before` says how many).

`--segments=G[:FORMULATION]` is shorthand for `--segments=G [--conv-formulation=FORMULATION]`.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from typing import Any, Sequence

import jax

from xception_jax.tools import benchmark


def expand(points: Sequence[str], segments: Sequence[str]) -> list[str]:
  """Point flag strings, the --segments=G[:FORMULATION] shorthands after the explicit ones."""
  out = list(points)
  for item in segments:
    g, _, form = item.partition(":")
    out.append(f"--segments={g}" + (f" --conv-formulation={form}" if form else ""))
  return out


def run_points(common: str, points: Sequence[str], tag: str, jsonl_out: str) -> list[dict[str, Any]]:
  """Runs every point (parsed before any is run, so a typo fails at once); returns the results."""
  settings = [benchmark.parse_args(shlex.split(common) + shlex.split(point))[0] for point in points]
  for s in settings:
    s.validate()
  results = []
  for i, (point, s) in enumerate(zip(points, settings)):
    start = time.perf_counter()
    try:
      result = benchmark.run_benchmark(s)
    except Exception as e:  # pylint: disable=broad-except  (one failed point must not stop the rest)
      result = {"error": f"{type(e).__name__}: {e}"[-2000:],
                "traceback": traceback.format_exc()[-3000:]}
    result.update(tag=tag, point=point, common=common, points_before=i, source="run_points",
                  wall_s=time.perf_counter() - start)
    results.append(result)
    with open(jsonl_out, "a") as f:
      f.write(json.dumps(result) + "\n")
    summary = result.get("error") or (f"{result['step_time_ms']:.1f} ms/step, "
                                      f"{result['images_per_sec']:.1f} images/s, compile "
                                      f"{result['compile_s']:.0f} s, ops {result['hlo_ops']}")
    print(f"[{tag}] {point}: {summary}", file=sys.stderr, flush=True)
    jax.clear_caches()  # free this point's executables before the next one compiles
    gc.collect()
  return results


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("points", nargs="*", help="benchmark flags of one point, as one string")
  p.add_argument("--segments", action="append", default=[],
                 help="G[:FORMULATION]: a point --segments=G [--conv-formulation=FORMULATION]")
  p.add_argument("--common", default="", help="benchmark flags shared by every point")
  p.add_argument("--tag", default="points", help="written into every result")
  p.add_argument("--jsonl-out", required=True, help="results are appended here, one per line")
  args = p.parse_args(argv)
  points = expand(args.points, args.segments)
  if not points:
    p.error("no points: give flag strings or --segments=G[:FORMULATION]")
  try:
    results = run_points(args.common, points, args.tag, args.jsonl_out)
  except (ValueError, SystemExit) as e:  # a bad flag: refused before anything ran
    print(f"run_points: {e}", file=sys.stderr)
    return 2
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
