"""Where the traced steps' device time goes: the top kernels of a `jax.profiler.trace` folder.

  python bench/profile_summary.py TRACE_DIR [--top=15] [--steps=5] [--json-out=F]

Why: when a GPU target is missed, the issue asks for the kernels that take the time, summarised
small enough to paste into BENCHMARKS.md, from a trace taken on a machine that keeps nothing
(`tools/benchmark.py --profile-dir=DIR` traces 5 steps; the trace itself is too large to bring
back). Reads the newest `*.xplane.pb` under TRACE_DIR with `jax.profiler.ProfileData` (no
TensorFlow or TensorBoard needed) and adds up event durations by name:

  GPU (or TPU) trace: the device planes ('/device:GPU:0', ...), on their stream lines (one event
    per kernel launch; lines the profiler derives from them, such as 'XLA Ops', are left out so
    nothing counts twice). Each kernel also names the XLA op it ran for (`hlo_op`), where the
    trace records it.
  CPU trace (what --smoke produces): the host plane's XLA:CPU threads (all lines but 'python').

Totals are summed over every launch in the trace; 'ms/step' divides by --steps. The share is of
the summed time of all kernels (overlapping streams count separately).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
from typing import Any, Sequence

# Lines that the profiler derives from the kernel lines of a device plane (they repeat its time).
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops",
                  "Framework Name Scope", "Source code", "TensorFlow Ops", "Async XLA Ops",
                  "SparseCore", "Launch Stats")
# Host-thread events of XLA:CPU that are markers or enclose the op events (would count twice).
_CPU_MARKERS = ("ThreadpoolListener::", "end: ", "ThunkExecutor::")


def find_xplane(path: str) -> str:
  """The newest `*.xplane.pb` at or under `path`; FileNotFoundError naming `path` if none."""
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  if not found:
    raise FileNotFoundError(f"{path}: no *.xplane.pb under it; expected the folder given to "
                            "jax.profiler.trace (tools/benchmark.py --profile-dir)")
  return max(found, key=os.path.getmtime)


def _stat(event, name: str) -> Any:
  for key, value in event.stats:
    if key == name:
      return value
  return None


def summarize(xplane_path: str, top: int = 15, steps: int = 5) -> dict[str, Any]:
  """{'kind', 'planes', 'lines', 'total_ms', 'top': [{'name', 'total_ms', ...}]}."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  data = ProfileData.from_file(xplane_path)
  planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  kind = "device"
  if planes:
    lines = [(p.name, line) for p in planes for line in p.lines]
    streams = [(p, l) for p, l in lines if "stream" in l.name.lower()]
    lines = streams or [(p, l) for p, l in lines if l.name not in _DERIVED_LINES]
  else:
    kind = "host"
    planes = [p for p in data.planes if p.name == "/host:CPU"]
    lines = [(p.name, l) for p in planes for l in p.lines if l.name != "python"]
  totals: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  hlo_ops: dict[str, str] = {}
  for _, line in lines:
    for event in line.events:
      if event.duration_ns <= 0 or (kind == "host" and event.name.startswith(_CPU_MARKERS)):
        continue
      totals[event.name] += event.duration_ns
      counts[event.name] += 1
      if event.name not in hlo_ops:
        op = _stat(event, "hlo_op")
        if op:
          hlo_ops[event.name] = str(op)
  total = sum(totals.values())
  ranked = sorted(totals, key=totals.get, reverse=True)[:top]
  return {
      "xplane": xplane_path,
      "kind": kind,
      "planes": sorted({p.name for p in planes}),
      "lines": sorted({f"{plane}: {line.name}" for plane, line in lines}),
      "steps": steps,
      "total_ms": total / 1e6,
      "top": [{"name": name, "total_ms": totals[name] / 1e6, "ms_per_step": totals[name] / 1e6 / steps,
               "share": totals[name] / total if total else 0.0, "count": counts[name],
               "hlo_op": hlo_ops.get(name)} for name in ranked],
  }


def format_table(summary: dict[str, Any], name_width: int = 90) -> str:
  """A Markdown table for BENCHMARKS.md."""
  lines = [f"{summary['kind']} time in {summary['xplane']}: "
           f"{summary['total_ms']:.1f} ms over {summary['steps']} steps "
           f"({', '.join(summary['planes'])})", "",
           "| # | kernel | XLA op | ms/step | share | launches |", "|---:|---|---|---:|---:|---:|"]
  for i, row in enumerate(summary["top"], 1):
    name = row["name"] if len(row["name"]) <= name_width else row["name"][:name_width - 3] + "..."
    lines.append(f"| {i} | `{name}` | {row['hlo_op'] or ''} | {row['ms_per_step']:.2f} | "
                 f"{100 * row['share']:.1f}% | {row['count']} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("trace", help="the folder given to jax.profiler.trace, or an .xplane.pb file")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--steps", type=int, default=5, help="steps in the trace (for ms/step)")
  p.add_argument("--json-out", default="", help="also write the summary here as JSON")
  p.add_argument("--jsonl-out", default="",
                 help="also append the summary to this JSON-lines file (stage 'profile')")
  args = p.parse_args(argv)
  try:
    summary = summarize(find_xplane(args.trace), args.top, args.steps)
  except FileNotFoundError as e:
    print(f"profile_summary: {e}", file=sys.stderr)
    return 1
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(summary, f, indent=1)
  if args.jsonl_out:
    with open(args.jsonl_out, "a") as f:
      f.write(json.dumps({"stage": "profile", "trace": args.trace, **summary}) + "\n")
  print(format_table(summary), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
