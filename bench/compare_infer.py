"""CPU inference: our export (`export.load(DIR)`) against Keras 3's `model.predict`, same network.

  python bench/compare_infer.py                                  # batch 1 and 32 at 299x299, 3 rounds
  python bench/compare_infer.py --rounds=3 --calls=5 --json-out=F \
      --torch-python=/path/to/torch/venv/bin/python --ort-python=/path/to/ort/venv/bin/python

What is timed, per batch size B (a preprocessed float32 [B, 299, 299, 3] batch, random Xception
weights; the arithmetic does not depend on their values):
  * ours, `export.load(DIR).predict_preprocessed(x)`: the exported StableHLO function, as
    `predict` and a serving process run it (probabilities back on the host);
  * ours, `export.load(DIR).predict(images)`: the same from B uint8 500x375 images, our numpy/PIL
    eval preprocessing (central crop, bilinear resize, scaling) included;
  * Keras 3, `keras.applications.Xception(weights=None)`: `model.predict(x, batch_size=B)` (what
    Keras users call) and `model.predict_on_batch(x)` (less per-call overhead), on the JAX
    backend and on the TensorFlow backend (Keras's default);
  * optionally timm's `legacy_xception` (the same network) exported to ONNX and run by
    onnxruntime on the CPU (`--torch-python` exports it once, with torch, timm, onnx and
    onnxscript importable, `--torch-pythonpath` added to its PYTHONPATH if they live elsewhere;
    `--ort-python` runs it, with onnxruntime). No target: it is what a CPU server would use.

How: every implementation runs in its own fresh process (no shared thread pools or caches), in an
order that rotates each round, so that load from other processes falls on all of them alike.
Each process times `--warmup` calls (the first compiles), then `--calls` calls per batch size;
per call the wall time and the process CPU time (all threads). The summary is the median over
rounds of each process's median. The 1-minute load average before each process is recorded: on a
shared machine, compare the CPU-time columns, which move less with foreign load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time_calls(fn: Callable[[], Any], calls: int, warmup: int) -> dict[str, float]:
  """First call (compile), then warm-up calls, then `calls` timed calls: medians in ms."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(warmup):
    fn()
  wall, cpu = [], []
  for _ in range(calls):
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - cpu_start)
  return {"first_call_s": first, "wall_ms": statistics.median(wall) * 1e3,
          "wall_ms_min": min(wall) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3}


def _inputs(batch: int, image_size: int, channels_first: bool = False):
  import numpy as np  # pylint: disable=g-import-not-at-top
  shape = (batch, 3, image_size, image_size) if channels_first else (
      batch, image_size, image_size, 3)
  return np.random.default_rng(batch).uniform(-1, 1, shape).astype(np.float32)


# --- One process each ----------------------------------------------------------------------------


def measure_ours(export_dir: str, batches: Sequence[int], calls: int, warmup: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from xception_jax import export  # pylint: disable=g-import-not-at-top

  predictor = export.load(export_dir, max_batch_size=max(batches))
  size = predictor.image_size
  rng = np.random.default_rng(0)
  results = {}
  for batch in batches:
    x = _inputs(batch, size)
    results[f"predict_preprocessed/{batch}"] = _time_calls(
        lambda: predictor.predict_preprocessed(x), calls, warmup)
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(batch)]
    results[f"predict_uint8_500x375/{batch}"] = _time_calls(
        lambda: predictor.predict(images), calls, warmup)
  return {"framework": f"xception_jax export (jax {jax.__version__})", "results": results}


def measure_keras(backend: str, batches: Sequence[int], image_size: int, calls: int,
                  warmup: int) -> dict:
  os.environ["KERAS_BACKEND"] = backend
  import keras  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != backend:
    raise RuntimeError(f"Keras backend is {keras.backend.backend()!r}, expected {backend!r}")
  keras.utils.set_random_seed(0)
  model = keras.applications.Xception(weights=None, input_shape=(image_size, image_size, 3))
  results = {}
  for batch in batches:
    x = _inputs(batch, image_size)
    results[f"predict/{batch}"] = _time_calls(
        lambda: model.predict(x, batch_size=batch, verbose=0), calls, warmup)
    results[f"predict_on_batch/{batch}"] = _time_calls(
        lambda: model.predict_on_batch(x), calls, warmup)
  versions = {"keras": keras.__version__}
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    versions["jax"] = jax.__version__
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    versions["tensorflow"] = tf.__version__
  return {"framework": f"keras {keras.__version__} ({backend} backend)", "versions": versions,
          "num_params": int(model.count_params()), "results": results}


def export_onnx(path: str, image_size: int) -> None:
  """timm's legacy_xception (random weights) to ONNX with a dynamic batch axis."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = timm.create_model("legacy_xception", pretrained=False).eval()
  example = torch.randn(1, 3, image_size, image_size)
  with torch.no_grad():
    torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                      dynamo=True)
  print(json.dumps({"torch": torch.__version__, "timm": timm.__version__}))


def measure_onnx(path: str, batches: Sequence[int], image_size: int, calls: int,
                 warmup: int) -> dict:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  results = {}
  for batch in batches:
    x = _inputs(batch, image_size, channels_first=True)
    results[f"run/{batch}"] = _time_calls(lambda: session.run(None, {name: x}), calls, warmup)
  return {"framework": f"onnxruntime {ort.__version__} (timm legacy_xception)",
          "results": results}


# --- The comparison ------------------------------------------------------------------------------


def _run_json(command: list[str], env: dict[str, str]) -> dict:
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_export(directory: str, image_size: int) -> str:
  """A full-size Xception export with random weights (saved_model off: not timed here)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from xception_jax import export  # pylint: disable=g-import-not-at-top
  from xception_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("xception")
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(
      jnp.zeros((1, image_size, image_size, 3)))
  config = ml_collections.ConfigDict(dict(
      model_name="xception", model={}, dtype="float32", image_size=image_size,
      input=dict(eval_crop_fraction=0.875), dataset="none"))
  out = os.path.join(directory, "export")
  export.write_export(out, config, {"num_classes": 1000, "loss": "softmax"}, variables,
                      source={"step": 0, "weights": "random"}, saved_model=False)
  return out


def compare(args: argparse.Namespace) -> dict[str, Any]:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain `python` run gets
  batches = ",".join(map(str, args.batches))
  common = [f"--batches={batches}", f"--image-size={args.image_size}", f"--calls={args.calls}",
            f"--warmup={args.warmup}"]
  work = tempfile.mkdtemp(prefix="compare_infer_")
  export_dir = _write_export(work, args.image_size)
  me = [sys.executable, os.path.abspath(__file__)]
  commands = {
      "ours": me + [f"--measure-ours={export_dir}"] + common,
      "keras_jax": me + ["--measure-keras=jax"] + common,
      "keras_tensorflow": me + ["--measure-keras=tensorflow"] + common,
  }
  versions = {}
  if args.torch_python and args.ort_python:
    onnx_path = os.path.join(work, "legacy_xception.onnx")
    torch_env = dict(env)
    if args.torch_pythonpath:
      torch_env["PYTHONPATH"] = args.torch_pythonpath
    versions.update(_run_json([args.torch_python, os.path.abspath(__file__),
                               f"--export-onnx={onnx_path}", f"--image-size={args.image_size}"],
                              torch_env))
    commands["onnxruntime"] = [args.ort_python, os.path.abspath(__file__),
                               f"--measure-onnx={onnx_path}"] + common
  names = list(commands)
  runs: dict[str, list[dict]] = {name: [] for name in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      load = os.getloadavg()[0]
      out = _run_json(commands[name], env)
      out["load_avg_1min_before"] = load
      runs[name].append(out)
      summary = ", ".join(f"{k} {v['wall_ms']:.0f} ms ({v['cpu_ms']:.0f} CPU)"
                          for k, v in out["results"].items())
      print(f"round {r + 1}/{args.rounds} {name}: {summary} (load {load:.1f})", file=sys.stderr,
            flush=True)
  summary = {name: {key: {stat: statistics.median(run["results"][key][stat] for run in runs[name])
                          for stat in ("wall_ms", "cpu_ms", "first_call_s")}
                    for key in runs[name][0]["results"]} for name in names}
  return {"image_size": args.image_size, "batches": args.batches, "calls": args.calls,
          "rounds": args.rounds, "cpu_count": os.cpu_count(),
          "machine": platform.processor() or platform.machine(),
          "python": platform.python_version(), "versions": versions, "summary": summary,
          "runs": runs}


def format_table(c: dict[str, Any]) -> str:
  lines = [f"Xception inference on the CPU ({c['cpu_count']} cores), {c['image_size']}x"
           f"{c['image_size']}, median of {c['rounds']} rounds x {c['calls']} calls; ms per call",
           "| implementation | call | " + " | ".join(
               f"batch {b} wall | batch {b} CPU" for b in c["batches"]) + " |",
           "|---|---|" + "---:|---:|" * len(c["batches"])]
  for name, rows in c["summary"].items():
    framework = c["runs"][name][0]["framework"]
    for call in dict.fromkeys(key.split("/")[0] for key in rows):
      cells = " | ".join(f"{rows[f'{call}/{b}']['wall_ms']:.0f} | {rows[f'{call}/{b}']['cpu_ms']:.0f}"
                         for b in c["batches"])
      lines.append(f"| {framework} | {call} | {cells} |")
  reference = c["summary"]["ours"]
  for name in ("keras_jax", "keras_tensorflow"):
    for b in c["batches"]:
      ours = reference[f"predict_preprocessed/{b}"]
      keras_ = c["summary"][name][f"predict/{b}"]
      lines.append(f"ours (predict_preprocessed) vs {name} model.predict, batch {b}: "
                   f"{keras_['wall_ms'] / ours['wall_ms']:.2f}x by wall time, "
                   f"{keras_['cpu_ms'] / ours['cpu_ms']:.2f}x by CPU time (> 1: ours is faster)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 32])
  p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=299)
  p.add_argument("--calls", type=int, default=5, help="timed calls per batch size and process")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--torch-python", default="", help="python with torch, timm, onnx, onnxscript")
  p.add_argument("--torch-pythonpath", default="", help="PYTHONPATH for --torch-python")
  p.add_argument("--ort-python", default="", help="python with onnxruntime")
  p.add_argument("--json-out", default="", help="also write every measurement here")
  p.add_argument("--measure-ours", default="", help=argparse.SUPPRESS)
  p.add_argument("--measure-keras", default="", help=argparse.SUPPRESS)
  p.add_argument("--export-onnx", default="", help=argparse.SUPPRESS)
  p.add_argument("--measure-onnx", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.measure_ours:
    print(json.dumps(measure_ours(args.measure_ours, args.batches, args.calls, args.warmup)))
  elif args.measure_keras:
    print(json.dumps(measure_keras(args.measure_keras, args.batches, args.image_size, args.calls,
                                   args.warmup)))
  elif args.export_onnx:
    export_onnx(args.export_onnx, args.image_size)
  elif args.measure_onnx:
    print(json.dumps(measure_onnx(args.measure_onnx, args.batches, args.image_size, args.calls,
                                  args.warmup)))
  else:
    result = compare(args)
    if args.json_out:
      with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result), flush=True)


if __name__ == "__main__":
  main()
