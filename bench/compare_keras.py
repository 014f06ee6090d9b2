"""CPU comparison: our Xception training step against Keras 3 (JAX backend) training the same net.

  python bench/compare_keras.py                        # batch 32 at 71x71, float32, 3 rounds
  python bench/compare_keras.py --batch=32 --image-size=71 --steps=8 --rounds=3 --json-out=F

Why: the issue's CPU target is that our step is at least as fast as the obvious alternative, Keras
Applications' Xception trained by Keras 3 on JAX, at the same batch and image size. Both sides
compile with XLA for the same CPU, so a gap is in what each framework asks XLA to compute (layout,
batch norm formulation, optimizer and EMA work, donation), not in the compiler.

How: each measurement runs in a fresh subprocess (one framework per process, so neither inherits
the other's thread pools or compilation caches), and the two alternate for --rounds rounds (A B,
B A, ...) so that load from other processes on a shared machine falls on both alike. Per round
and framework: the median wall time of --steps synchronised steps after compiling and 2 warm-up
steps, and the process CPU time per step (all threads), which moves less with foreign load.

Ours is `python -m xception_jax.tools.benchmark --mode=train`: the real training step of the
paper's ImageNet recipe (SGD momentum 0.9, L2 decay 1e-5 on kernels, dropout 0.5, EMA of weights
and batch statistics, metrics). Keras: `keras.applications.Xception(weights=None)` (no dropout;
its only head is the classifier), SGD momentum 0.9, sparse categorical cross-entropy,
`jit_compile=True`, timed through `train_on_batch` on pre-made device arrays (each call returns
the loss to the host, so it is synchronised). Ours does slightly more work per step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_keras(batch: int, image_size: int, steps: int, warmup: int, num_classes: int) -> dict:
  """Times Keras 3 (JAX backend) training keras.applications.Xception; run in its own process."""
  os.environ["KERAS_BACKEND"] = "jax"
  import jax  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "jax":
    raise RuntimeError(
      f"Keras backend is {keras.backend.backend()!r}, expected 'jax' "
      "(KERAS_BACKEND must be set before keras is first imported)"
    )
  keras.utils.set_random_seed(0)
  model = keras.applications.Xception(
    weights=None, input_shape=(image_size, image_size, 3), classes=num_classes
  )
  model.compile(
    optimizer=keras.optimizers.SGD(learning_rate=0.045, momentum=0.9),
    loss=keras.losses.SparseCategoricalCrossentropy(),
    jit_compile=True,
  )
  rng = np.random.default_rng(0)
  batches = [
    (
      jax.device_put(rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)),
      jax.device_put(rng.integers(0, num_classes, (batch,)).astype(np.int32)),
    )
    for _ in range(3)
  ]
  start = time.perf_counter()
  model.train_on_batch(*batches[0])  # traces and compiles
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    model.train_on_batch(*batches[(i + 1) % 3])
  times = []
  cpu_start = time.process_time()
  for i in range(steps):
    start = time.perf_counter()
    loss = model.train_on_batch(*batches[i % 3])
    times.append(time.perf_counter() - start)
  cpu_s = (time.process_time() - cpu_start) / steps
  if not np.isfinite(float(np.asarray(loss))):
    raise FloatingPointError(f"Keras training loss is {loss}")
  step_s = statistics.median(times)
  return {
    "framework": f"keras {keras.__version__} (jax backend)",
    "num_params": int(model.count_params()),
    "num_trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
    "compile_s": compile_s,
    "step_time_ms": step_s * 1e3,
    "step_time_ms_min": min(times) * 1e3,
    "images_per_sec": batch / step_s,
    "process_cpu_ms_per_step": cpu_s * 1e3,
    "jax_version": jax.__version__,
  }


def _run_json(args: list[str], env: dict[str, str]) -> dict:
  """Runs a Python command in the repo root; returns the JSON object on its last output line."""
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False
  )
  if proc.returncode:
    raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(
  batch: int, image_size: int, steps: int, warmup: int, rounds: int, num_classes: int, dtype: str
) -> dict[str, Any]:
  """Alternating rounds of both measurements; returns every round and the medians over rounds."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)  # one CPU device each, as a plain `python` run gets
  ours_cmd = [
    "-m",
    "xception_jax.tools.benchmark",
    "--model=xception",
    "--mode=train",
    f"--batch={batch}",
    f"--image_size={image_size}",
    f"--steps={steps}",
    f"--warmup={warmup}",
    f"--dtype={dtype}",
    f"--num_classes={num_classes}",
    "--json",
  ]
  keras_cmd = [
    os.path.abspath(__file__),
    "--measure-keras",
    f"--batch={batch}",
    f"--image-size={image_size}",
    f"--steps={steps}",
    f"--warmup={warmup}",
    f"--num-classes={num_classes}",
  ]
  results: dict[str, list[dict]] = {"ours": [], "keras": []}
  for r in range(rounds):
    order = ("ours", "keras") if r % 2 == 0 else ("keras", "ours")
    for name in order:
      load = os.getloadavg()[0]
      out = _run_json(ours_cmd if name == "ours" else keras_cmd, env)
      out["load_avg_1min_before"] = load
      results[name].append(out)
      print(
        f"round {r + 1}/{rounds} {name:5s}: {out['step_time_ms']:8.1f} ms/step wall, "
        f"{out['process_cpu_ms_per_step']:8.1f} ms/step CPU, {out['images_per_sec']:6.2f} "
        f"img/s (load {load:.1f})",
        file=sys.stderr,
        flush=True,
      )

  def median_of(name, key):
    return statistics.median(o[key] for o in results[name])

  summary = {
    name: {
      key: median_of(name, key)
      for key in ("step_time_ms", "process_cpu_ms_per_step", "images_per_sec", "compile_s")
    }
    for name in results
  }
  return {
    "batch": batch,
    "image_size": image_size,
    "dtype": dtype,
    "steps": steps,
    "rounds": rounds,
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "summary": summary,
    "speedup_wall": summary["keras"]["step_time_ms"] / summary["ours"]["step_time_ms"],
    "speedup_cpu": (
      summary["keras"]["process_cpu_ms_per_step"] / summary["ours"]["process_cpu_ms_per_step"]
    ),
    "runs": results,
  }


def format_table(c: dict[str, Any]) -> str:
  ours, keras_ = c["runs"]["ours"][0], c["runs"]["keras"][0]
  lines = [
    f"Xception training step, batch {c['batch']} at {c['image_size']}x{c['image_size']}, "
    f"{c['dtype']}, CPU ({c['cpu_count']} cores), median of {c['rounds']} rounds x "
    f"{c['steps']} steps",
    f"| {'':34s} | ms/step (wall) | ms/step (CPU) | images/s | compile s | params |",
    f"|{'-' * 36}|---------------:|--------------:|---------:|----------:|-------:|",
  ]
  for name, label, params in (
    ("ours", f"xception_jax (jax {ours['jax_version']})", ours["num_params"]),
    ("keras", keras_["framework"], keras_["num_trainable_params"]),
  ):
    s = c["summary"][name]
    lines.append(
      f"| {label:34s} | {s['step_time_ms']:14.1f} | {s['process_cpu_ms_per_step']:13.1f}"
      f" | {s['images_per_sec']:8.2f} | {s['compile_s']:9.1f} | {params:,} |"
    )
  lines.append(
    f"ours vs Keras: {c['speedup_wall']:.2f}x by wall time, {c['speedup_cpu']:.2f}x by "
    "CPU time (> 1: ours is faster)"
  )
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=71)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=1000)
  p.add_argument(
    "--dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="our compute dtype (Keras runs float32)",
  )
  p.add_argument("--json-out", default="", help="also write every measurement here")
  p.add_argument("--measure-keras", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.measure_keras:
    print(
      json.dumps(
        measure_keras(args.batch, args.image_size, args.steps, args.warmup, args.num_classes)
      ),
      flush=True,
    )
    return
  result = compare(
    args.batch, args.image_size, args.steps, args.warmup, args.rounds, args.num_classes, args.dtype
  )
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=2)
  print(format_table(result), flush=True)


if __name__ == "__main__":
  main()
