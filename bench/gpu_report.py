"""The tables of BENCHMARKS.md sections 1 and 2, from the JSON lines of a `bench/gpu_run.sh` run.

  python bench/gpu_report.py results.jsonl                  # Markdown, to stdout
  python bench/gpu_report.py results.jsonl --profile-traces # traces of missed targets, one a line
  python bench/gpu_report.py results.jsonl --profile-rerun  # flags of the spectrum's worst point

Why: the GPU session that runs the script has minutes; what comes back is one results file
(stage records, environment, the `gpu` tests' measurements, every benchmark result), and the
tables, ratios and target verdicts are derived from it here, the same way every time, on the GPU
machine at the end of the run and again on any machine afterwards.

Targets (issues 12 and 13): training at >= 1.25x timm's best (eager or compiled) images/s,
inference at >= 1.0x; the spectrum's step time at every G <= 1.5x the slower endpoint (G = 1 and
depthwise) with the formulation the code picks (--conv-formulation=auto).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Sequence

TRAIN_TARGET = 1.25
INFER_TARGET = 1.0
SPECTRUM_TARGET = 1.5
SPECTRUM_ORDER = ["1", "2", "4", "8", "16", "32", "64", "depthwise"]


def load(path: str) -> list[dict[str, Any]]:
  """The JSON objects of a JSON-lines file; lines that do not parse (a cut-off write) skipped."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        value = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(value, dict):
        records.append(value)
  return records


def _fmt(value: float | None, spec: str = ".1f") -> str:
  return "" if value is None else format(value, spec)


class _Missing(dict):
  """format_map source that shows '?' for a field a record lacks."""

  def __missing__(self, key: str) -> str:
    return "?"


def _ok(record: dict[str, Any]) -> bool:
  return "error" not in record and record.get("images_per_sec") is not None


# ----------------------------------------------------------------------------------------------
# Section 1: ours against timm.
# ----------------------------------------------------------------------------------------------

def _timm(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
  """(model, mode, impl) -> the last compare_timm record of it."""
  return {(r["model"], r["mode"], r["impl"]): r for r in records
          if r.get("source") == "compare_timm"}


def targets(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (model, mode) with ours and at least one timm result: the ratio to timm's best."""
  table = _timm(records)
  out = []
  for model, mode in sorted({(m, mo) for m, mo, _ in table}):
    ours = table.get((model, mode, "ours"))
    timm = [table[(model, mode, i)] for i in ("timm eager", "timm compile")
            if (model, mode, i) in table and _ok(table[(model, mode, i)])]
    if not (ours and _ok(ours) and timm):
      continue
    best = max(timm, key=lambda r: r["images_per_sec"])
    target = TRAIN_TARGET if mode == "train" else INFER_TARGET
    ratio = ours["images_per_sec"] / best["images_per_sec"]
    out.append({"model": model, "mode": mode, "ratio": ratio, "target": target,
                "met": ratio >= target, "best": best["impl"], "ours": ours})
  return out


def section1(records: Sequence[dict[str, Any]]) -> str:
  table = _timm(records)
  if not table:
    return ""
  lines = ["| model | mode | implementation | images/s | ms/step | ours / this | compile s | "
           "peak GiB | MFU |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  names = {"xception": "Xception", "inception_v3": "Inception V3"}
  for (model, mode, impl), r in sorted(table.items()):
    label = f"| {names.get(model, model)} | {mode} | {impl} |"
    if not _ok(r):
      lines.append(f"{label} failed: {str(r.get('error', '?')).splitlines()[-1][:100]} | | | | | |")
      continue
    ours = table.get((model, mode, "ours"))
    ratio = (f"{ours['images_per_sec'] / r['images_per_sec']:.2f}x" if ours and _ok(ours)
             else "")
    mem = r.get("peak_memory_bytes_device")
    mfu = r.get("mfu")
    lines.append(f"{label} {r['images_per_sec']:.1f} | {r['step_time_ms']:.1f} | {ratio} | "
                 f"{_fmt(r.get('compile_s'))} | {_fmt(mem / 2**30 if mem else None)} | "
                 f"{_fmt(100 * mfu if mfu is not None else None)}{'%' if mfu is not None else ''} |")
  verdicts = [f"- {names.get(t['model'], t['model'])} {t['mode']}: ours / {t['best']} (timm's "
              f"best) = {t['ratio']:.2f}x, target >= {t['target']}x: "
              + ("met" if t["met"] else f"MISSED by {100 * (1 - t['ratio'] / t['target']):.0f}%")
              for t in targets(records)]
  any_ours = next((r for r in table.values() if r["impl"] == "ours" and _ok(r)), None)
  any_timm = next((r for r in table.values() if r["impl"] != "ours" and _ok(r)), None)
  notes = []
  if any_ours:
    notes.append("ours: {num_devices} x {device_kind}, batch {batch} at {image_size}, {dtype}, "
                 "jax {jax_version}, flax {flax_version}, optax {optax_version}, Python "
                 "{python_version}, {date}".format_map(_Missing(any_ours)))
  if any_timm:
    notes.append("timm: {device_kind}, torch {torch_version}, timm {timm_version}".format_map(
        _Missing(any_timm)))
  return "\n".join(lines + [""] + verdicts + [""] + notes)


# ----------------------------------------------------------------------------------------------
# Section 2: the spectrum, each formulation side by side.
# ----------------------------------------------------------------------------------------------

def _spectrum(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """segments -> {'auto' | 'forced': record}; 'forced' = any point with a conv formulation set."""
  points: dict[str, dict[str, dict[str, Any]]] = {}
  for r in records:
    if r.get("source") != "run_points" or not str(r.get("tag", "")).startswith("spectrum"):
      continue
    g = str(r.get("segments", _segments_of(r.get("point", ""))))
    form = r.get("conv_formulation") or _formulation_of(r.get("point", ""))
    points.setdefault(g, {})["auto" if form == "auto" else "forced"] = r
  return points


def _segments_of(point: str) -> str:
  for flag in point.split():
    if flag.startswith("--segments="):
      return flag.split("=", 1)[1]
  return "?"


def _formulation_of(point: str) -> str:
  for flag in point.split():
    if flag.startswith("--conv-formulation="):
      return flag.split("=", 1)[1]
  return "auto"


def spectrum_ratios(records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """segments -> auto step time / the slower endpoint's (both endpoints needed)."""
  points = _spectrum(records)
  ends = [points.get(g, {}).get("auto") for g in ("1", "depthwise")]
  if not all(e and _ok(e) for e in ends):
    return {}
  slower = max(e["step_time_ms"] for e in ends)
  return {g: p["auto"]["step_time_ms"] / slower for g, p in points.items()
          if "auto" in p and _ok(p["auto"])}


def section2(records: Sequence[dict[str, Any]]) -> str:
  points = _spectrum(records)
  if not points:
    return ""
  ratios = spectrum_ratios(records)
  lines = ["| segments G | params | auto ms/step | images/s | vs slower endpoint | forced form | "
           "forced ms/step | images/s | forced / auto | ops auto -> forced (conv/dot) |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
  order = SPECTRUM_ORDER + sorted(set(points) - set(SPECTRUM_ORDER))
  for g in [g for g in order if g in points]:
    auto, forced = points[g].get("auto"), points[g].get("forced")
    base = auto if auto and _ok(auto) else forced
    cells = [g, f"{base['num_params']:,}" if base and _ok(base) else ""]
    if auto and _ok(auto):
      cells += [f"{auto['step_time_ms']:.1f}", f"{auto['images_per_sec']:.1f}",
                f"{ratios[g]:.2f}x" if g in ratios else ""]
    else:
      cells += [f"failed: {str(auto.get('error', '?'))[:60]}" if auto else "not run", "", ""]
    if forced:
      cells.append(forced.get("conv_formulation") or _formulation_of(forced.get("point", "")))
      if _ok(forced):
        cells += [f"{forced['step_time_ms']:.1f}", f"{forced['images_per_sec']:.1f}",
                  f"{forced['step_time_ms'] / auto['step_time_ms']:.2f}x"
                  if auto and _ok(auto) else ""]
      else:
        cells += [f"failed: {str(forced.get('error', '?'))[:60]}", "", ""]
    else:
      cells += ["not run", "", "", ""]
    ops = [r.get("hlo_ops") for r in (auto, forced) if r and _ok(r)]
    cells.append(" -> ".join(f"{o['convolution']}/{o['dot_general']}" for o in ops))
    lines.append("| " + " | ".join(cells) + " |")
  notes = []
  if ratios:
    worst = max(ratios, key=ratios.get)
    notes.append(f"Target (auto, every G <= {SPECTRUM_TARGET}x the slower endpoint): "
                 + ("met" if ratios[worst] <= SPECTRUM_TARGET else "MISSED")
                 + f"; worst G = {worst} at {ratios[worst]:.2f}x.")
  first = next((r for p in points.values() for r in p.values() if _ok(r)), None)
  if first:
    notes.append("{num_devices} x {device_kind}, batch {batch} at {image_size}, {dtype}, {steps} "
                 "timed steps, jax {jax_version}, {date}".format_map(_Missing(first)))
  return "\n".join(lines + [""] + notes)


# ----------------------------------------------------------------------------------------------
# The gpu tests, stages, environment.
# ----------------------------------------------------------------------------------------------

def other_points(records: Sequence[dict[str, Any]]) -> str:
  """run_points results outside the spectrum (e.g. the 1x1 formulation on Xception)."""
  rows = [r for r in records if r.get("source") == "run_points"
          and not str(r.get("tag", "")).startswith("spectrum")]
  if not rows:
    return ""
  lines = ["| tag | point | ms/step | images/s | ops (conv/dot) |", "|---|---|---:|---:|---|"]
  for r in rows:
    if _ok(r):
      ops = r.get("hlo_ops") or {}
      lines.append(f"| {r['tag']} | `{r['point']}` | {r['step_time_ms']:.1f} | "
                   f"{r['images_per_sec']:.1f} | {ops.get('convolution')}/{ops.get('dot_general')} |")
    else:
      lines.append(f"| {r['tag']} | `{r['point']}` | failed: {str(r.get('error'))[:80]} | | |")
  return "\n".join(lines)


def tests_section(records: Sequence[dict[str, Any]]) -> str:
  rows = [r for r in records if r.get("stage") == "gpu-tests" and "test" in r]
  lines = []
  for r in rows:
    if r["test"] == "forward_parity":
      model = " ".join([r["model"], *(f"{k}={v}" for k, v in (r.get("settings") or {}).items())])
      lines.append(f"- parity {model} {r['dtype']} on {r['device']}: max |accelerator - CPU "
                   f"fp32| = {r['error_vs_cpu_fp32']:.2e} of the largest logit "
                   f"(tolerance {r['tolerance']:g})")
    elif r["test"] == "train_steps":
      lines.append(f"- {r['model']} {r['dtype']} batch {r['batch']} at {r['image_size']}: loss "
                   f"{r['first5_mean']:.3f} (first 5 mean) -> {r['last5_mean']:.3f} (last 5)")
    elif r["test"] == "resume":
      lines.append(f"- resume ({r['steps']}), flags {r['deterministic_flags'] or 'none'}: bit-exact "
                   f"{r['bit_exact']}; L2 distance of the parameters A-A' {r['a_vs_a2_l2']:.3g}, "
                   f"A-resumed {r['a_vs_resumed_l2']:.3g}, moved {r['params_moved_l2']:.3g}")
    elif r["test"] == "export_gpu_to_cpu":
      lines.append(f"- export {r['model']} written on {r['device']}, predicted on the CPU: "
                   f"{r['error']:.2e} of the largest logit (tolerance {r['tolerance']:g})")
  return "\n".join(lines)


def stages_section(records: Sequence[dict[str, Any]]) -> str:
  rows = [r for r in records if "status" in r and "stage" in r]
  lines = ["| stage | status | seconds | limit s |", "|---|---|---:|---:|"]
  lines += [f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {r.get('limit_s', '')} |"
            for r in rows]
  return "\n".join(lines) if rows else ""


def env_section(records: Sequence[dict[str, Any]]) -> str:
  return "\n".join(f"- {r['what']}: {r['value']}" for r in records
                   if r.get("stage") == "env" and "what" in r)


def report(records: Sequence[dict[str, Any]]) -> str:
  parts = [("Environment", env_section(records)), ("Stages", stages_section(records)),
           ("GPU tests", tests_section(records)), ("Section 1: ours against timm",
                                                    section1(records)),
           ("Section 2: the spectrum", section2(records)),
           ("Other benchmark points", other_points(records))]
  return "\n\n".join(f"## {title}\n\n{body}" for title, body in parts if body) + "\n"


def profile_traces(records: Sequence[dict[str, Any]]) -> list[str]:
  """Trace folders of our measurements whose target was missed."""
  return [t["ours"]["profile_dir"] for t in targets(records)
          if not t["met"] and t["ours"].get("profile_dir")]


def profile_rerun(records: Sequence[dict[str, Any]]) -> str:
  """The benchmark flags (common + point) of the worst spectrum G if it misses the target."""
  ratios = spectrum_ratios(records)
  if not ratios or max(ratios.values()) <= SPECTRUM_TARGET:
    return ""
  worst = max(ratios, key=ratios.get)
  r = _spectrum(records)[worst]["auto"]
  return f"{r['common']} {r['point']}"


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("results", help="the results.jsonl of a gpu_run.sh run")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--profile-traces", action="store_true")
  mode.add_argument("--profile-rerun", action="store_true")
  args = p.parse_args(argv)
  records = load(args.results)
  if args.profile_traces:
    print("\n".join(profile_traces(records)))
  elif args.profile_rerun:
    print(profile_rerun(records))
  else:
    print(report(records), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
