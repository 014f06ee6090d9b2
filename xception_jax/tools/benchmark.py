"""Step-time benchmark of the real training step and of inference, on synthetic device data.

  python -m xception_jax.tools.benchmark --model=xception --mode=train --batch=128 \
      --image-size=299 --steps=30 --dtype=bfloat16 [--segments=4 --budget=params] [--json]

Why a tool of its own: a sweep over the spectrum is dozens of ImageNet-scale runs, so the cost of
one step decides what research is affordable, and it must be measured on exactly what training
runs. This tool therefore builds the step with the training job's own functions
(`train.create_model`, `optim.create_optimizer`, `train.create_train_state`,
`train.make_train_step`: loss, gradients, L2 decay, SGD momentum, EMA of weights and batch
statistics, NaN counter, metrics) from the paper's ImageNet recipe (`configs/imagenet.py`), and
jits it with the same shardings and state donation as `train.train_and_evaluate`. Inference is the
forward pass in eval mode with the EMA weights, as evaluation and export use them.

Batches are made on the device (`data/synthetic.py`), several distinct ones rotated so that no
step reuses the previous step's input and no host-to-device copy or input pipeline is timed
(BENCHMARKS.md times the input pipeline separately). Random images, never zeros: zeros can run
faster than real data.

What is printed (and with --json, one JSON object):
  compile_s        lowering + XLA compilation of the step, once.
  step_time_ms     median wall time of one step, each step synchronised (block_until_ready).
  process_cpu_ms_per_step  CPU time of this process (all threads) per timed step: on a shared
                   CPU host it is steadier than wall time; on accelerators it is host overhead.
  images_per_sec   batch / median step time.
  tflops           model FLOPs per step / median step time. Model FLOPs (`flops_source`):
                   'analytic' = 2 x multiply-adds x batch (x 3 for training: forward, backward
                   w.r.t. activations and w.r.t. weights) from `models.costs` for the Xception
                   family; 'xla_forward' = XLA's cost analysis of the forward pass (x 3 for
                   training) for other models. The XLA count of the whole compiled step
                   (`xla_flops_per_step`) is reported beside it: it also counts batch norm,
                   the optimizer and the EMA, so it is a little higher.
  mfu              tflops / (peak of the device kind x devices), from PEAK_TFLOPS below or
                   --peak-tflops; null where the peak is unknown (CPUs).
  peak_memory_*    device memory_stats() peak where the backend reports it (GPU, TPU), and
                   XLA's compiled memory analysis (arguments + outputs - aliased + temporaries)
                   everywhere. The device peak is the process's: in a process that ran other
                   configurations first it is the largest so far.
  conv_formulation, hlo_ops  --conv-formulation as given (auto = the platform table in
                   models/layers.py) and the count of convolution and dot_general ops in the
                   lowered step, which shows which formulation was compiled.

--conv-formulation=native|rewritten|KIND=FORM,... forces the depthwise, grouped or pointwise
convolutions to the native op or to their rewritten form on any platform (`layers.
conv_formulation`), to measure one against the other on the device at hand. --profile-dir=DIR
traces PROFILE_STEPS more steps after the timed ones with `jax.profiler.trace` (TensorBoard /
xprof format; `bench/profile_summary.py DIR` lists the top kernels).

No TensorFlow is imported on this path. It does import `configs` (the recipe) and therefore
`ml_collections`, which `xception_jax.train` and `xception_jax.optim` import as well.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax

from configs import imagenet
from xception_jax import data
from xception_jax import optim
from xception_jax import train
from xception_jax.data import synthetic
from xception_jax.models import layers

MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
# Weight decay per model in the paper's ImageNet recipe (configs/imagenet.py,
# configs/inception_v3_imagenet.py); other models get Xception's.
_WEIGHT_DECAY = {"inception_v3": 4e-5, "inception_v3_tiny": 4e-5}
_DEFAULT_WEIGHT_DECAY = 1e-5
NUM_INPUT_BATCHES = 3  # distinct device batches rotated through the timed steps
PROFILE_STEPS = 5  # steps traced after the timed ones when --profile-dir is given

# Dense (no 2:4 sparsity) peak TFLOP/s per device, (bfloat16, float32 as run by XLA). Matched as a
# lower-case substring of jax.Device.device_kind, first match wins (so 'h100 pcie' precedes
# 'h100'). float32 on NVIDIA GPUs since Ampere runs convolutions and matmuls in TF32 under JAX's
# default precision, so its peak is the TF32 tensor-core rate; TPUs run float32 matmuls as bf16
# passes, so no float32 peak is claimed for them (mfu null).
# Sources (vendor datasheets; "sparse" figures halved to dense):
#   H100 SXM: NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 / TF32 989 TFLOPS with
#     sparsity -> 989.4 / 494.7 dense (also Hopper whitepaper table 3, 1.83 GHz boost).
#   H100 PCIe: same datasheet: BF16 1,513 / TF32 756 with sparsity -> 756 / 378 dense.
#   H200: NVIDIA H200 datasheet: same GH100 compute as H100 SXM (BF16 1,979 sparse).
#   A100: NVIDIA A100 datasheet: BF16 312, TF32 156 dense.
#   TPU v4 275, v5e ('TPU v5 lite') 197, v5p ('TPU v5') 459, v6e ('TPU v6 lite') 918 bf16 per chip:
#     Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e).
PEAK_TFLOPS: tuple[tuple[str, float, float | None], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.4, 494.7),
    ("h200", 989.4, 494.7),
    ("a100", 312.0, 156.0),
    ("tpu v4", 275.0, None),
    ("tpu v5 lite", 197.0, None),
    ("tpu v5e", 197.0, None),
    ("tpu v5p", 459.0, None),
    ("tpu v5", 459.0, None),
    ("tpu v6 lite", 918.0, None),
    ("tpu v6e", 918.0, None),
)


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  """What to measure. `segments` is None (the model's default), an int or 'depthwise'."""
  model: str = "xception"
  mode: str = "train"
  batch: int = 32
  image_size: int = 299
  steps: int = 20
  warmup: int = 2
  dtype: str = "float32"
  segments: int | str | None = None
  budget: str | None = None
  num_classes: int = 1000
  peak_tflops: float | None = None  # overrides the PEAK_TFLOPS table
  conv_formulation: str = "auto"  # see layers.parse_conv_formulation
  profile_dir: str | None = None

  def validate(self) -> None:
    if self.mode not in MODES:
      raise ValueError(f"--mode={self.mode!r}; valid: {list(MODES)}")
    if self.dtype not in DTYPES:
      raise ValueError(f"--dtype={self.dtype!r}; valid: {list(DTYPES)}")
    for name in ("batch", "image_size", "steps", "num_classes"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
    if self.warmup < 0:
      raise ValueError(f"--warmup={self.warmup} must be >= 0")
    if self.budget not in (None, "params"):
      raise ValueError(f"--budget={self.budget!r}; valid: 'params' or unset")
    try:
      layers.parse_conv_formulation(self.conv_formulation)
    except ValueError as e:
      raise ValueError(f"--conv-formulation: {e}") from None
    if self.peak_tflops is not None and not self.peak_tflops > 0:
      raise ValueError(f"--peak-tflops={self.peak_tflops} must be > 0 (TFLOP/s of one device)")
    from xception_jax import models  # pylint: disable=g-import-not-at-top
    if self.model not in models.list_models():
      raise ValueError(f"--model={self.model!r}; valid: {', '.join(models.list_models())}")
    smallest = 75 if self.model.startswith("inception") else 71
    if self.image_size < smallest:
      raise ValueError(f"--image-size={self.image_size}: {self.model} needs >= {smallest}")
    try:  # segment counts that do not divide a layer's channels fail here, not after compiling
      models.create(self.model, num_classes=self.num_classes,
                    **({"segments": self.segments} if self.segments is not None else {}),
                    **({"budget": self.budget} if self.budget else {}))
    except (ValueError, TypeError) as e:
      flag = "--segments" if self.segments is not None else "--budget"
      raise ValueError(f"{flag}={self.segments if self.segments is not None else self.budget}: "
                       f"{e}") from None


def peak_tflops_for(device_kind: str, dtype: str) -> float | None:
  """The dense peak TFLOP/s of one device of this kind at this dtype, or None if unknown."""
  kind = device_kind.lower()
  for key, bf16, fp32 in PEAK_TFLOPS:
    if key in kind:
      return bf16 if dtype == "bfloat16" else fp32
  return None


def build_config(settings: BenchmarkSettings):
  """The paper's ImageNet recipe at the benchmark's batch, size, dtype and spectrum point."""
  config = imagenet.recipe(settings.model,
                           weight_decay=_WEIGHT_DECAY.get(settings.model, _DEFAULT_WEIGHT_DECAY))
  config.dataset = data.SYNTHETIC
  config.num_classes = settings.num_classes
  config.batch_size = settings.batch
  config.image_size = settings.image_size
  config.dtype = settings.dtype
  config.total_steps = settings.warmup + settings.steps + 1
  if settings.segments is not None:
    config.model.segments = settings.segments
  if settings.budget is not None:
    config.model.budget = settings.budget
  return config


def _flops(cost_analysis: Any) -> float | None:
  """'flops' from a Lowered/Compiled cost analysis (a dict, or a one-element list in old JAX)."""
  if isinstance(cost_analysis, (list, tuple)):
    cost_analysis = cost_analysis[0] if cost_analysis else None
  if not cost_analysis or "flops" not in cost_analysis:
    return None
  return float(cost_analysis["flops"])


def _compiled_memory_bytes(compiled) -> int | None:
  """XLA's static estimate of the step's device memory: arguments + outputs - aliased + temps."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _device_peak_memory_bytes() -> int | None:
  """The largest peak_bytes_in_use over local devices, where the backend reports it."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _analytic_forward_flops(settings: BenchmarkSettings) -> float | None:
  """2 x multiply-adds of one image's forward pass, for the Xception family; else None."""
  from xception_jax.models import costs  # pylint: disable=g-import-not-at-top
  kwargs: dict[str, Any] = {"num_classes": settings.num_classes}
  if settings.segments is not None:
    kwargs["segments"] = settings.segments
  if settings.budget is not None:
    kwargs["budget"] = settings.budget
  try:
    cost = costs.model_cost(settings.model, image_size=settings.image_size, **kwargs)
  except ValueError:  # not an Xception: no analytic formulas
    return None
  return 2.0 * cost.macs_total


def _time_steps(run_one: Callable[[int], Any], steps: int,
                warmup: int) -> tuple[list[float], float]:
  """Wall seconds per step, each synchronised, after `warmup` untimed steps; and the process's
  CPU seconds per step over the timed steps (all threads; on a shared CPU it moves less with
  other people's load than wall time does)."""
  for i in range(warmup):
    jax.block_until_ready(run_one(i))
  times = []
  cpu_start = time.process_time()
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run_one(warmup + i))
    times.append(time.perf_counter() - start)
  return times, (time.process_time() - cpu_start) / steps


def _count_ops(lowered) -> dict[str, int]:
  """Convolutions and dot_generals in the lowered (StableHLO) program."""
  text = lowered.as_text()
  return {op: text.count(f"stablehlo.{op}") for op in ("convolution", "dot_general")}


def _profile(run_one: Callable[[int], Any], first: int, profile_dir: str) -> str | None:
  """Traces PROFILE_STEPS steps into profile_dir; the error as text if tracing failed."""
  try:
    jax.block_until_ready(run_one(first))  # nothing pending when the trace starts
    with jax.profiler.trace(profile_dir):
      for i in range(1, PROFILE_STEPS + 1):
        jax.block_until_ready(run_one(first + i))
  except Exception as e:  # pylint: disable=broad-except  (the measurement stands without it)
    return f"{type(e).__name__}: {e}"
  return None


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
  """Builds, compiles and times one configuration; returns the measurements (see module doc)."""
  settings.validate()
  with layers.conv_formulation(settings.conv_formulation):
    return _run_benchmark(settings)


def _run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
  config = build_config(settings)
  mesh = train.make_mesh(config)
  train.validate_config(config, mesh.shape["data"], jax.process_count())
  model = train.create_model(config, settings.num_classes)
  steps_per_epoch = synthetic.NUM_TRAIN_EXAMPLES / settings.batch
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, config.total_steps)
  state, state_shardings = train.create_train_state(model, tx, settings.image_size, mesh,
                                                    config.seed)
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  keys = jax.random.split(jax.random.PRNGKey(1), NUM_INPUT_BATCHES)
  batches = [synthetic.make_batch(k, settings.batch, settings.image_size, settings.num_classes,
                                  sharding=data_sharding) for k in keys]
  jax.block_until_ready(batches)

  def infer(variables, images):
    return model.apply(variables, images, train=False)

  infer_jit = jax.jit(infer, in_shardings=(replicated, data_sharding), out_shardings=replicated)
  variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}

  start = time.perf_counter()
  if settings.mode == "train":
    # Exactly as train.train_and_evaluate compiles it.
    step_jit = train.jit_train_step(
        train.make_train_step(config, model, tx, schedule,
                              train.make_loss_fn("softmax", settings.num_classes,
                                                 config.label_smoothing), multi_label=False),
        state_shardings, mesh)
    lowered = step_jit.lower(state, batches[0])
  else:
    lowered = infer_jit.lower(variables, batches[0]["image"])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  if settings.mode == "train":
    holder = {"state": state}
    del state, variables  # donated from the first step on

    def run_one(i):
      holder["state"], metrics = compiled(holder["state"], batches[i % NUM_INPUT_BATCHES])
      return holder["state"], metrics
  else:
    holder = {"state": None}
    del state  # keep only the EMA weights alive, so peak memory is that of inference

    def run_one(i):
      return compiled(variables, batches[i % NUM_INPUT_BATCHES]["image"])

  times, cpu_s = _time_steps(run_one, settings.steps, settings.warmup)
  step_s = statistics.median(times)
  profile_error = (_profile(run_one, settings.warmup + settings.steps, settings.profile_dir)
                   if settings.profile_dir else None)

  passes = 3 if settings.mode == "train" else 1
  forward = _analytic_forward_flops(settings)
  if forward is not None:
    flops_source = "analytic"
    model_flops = forward * settings.batch * passes
  else:
    flops_source = "xla_forward"
    forward_lowered = (lowered if settings.mode == "infer" else
                       infer_jit.lower(jax.tree.map(
                           lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                           {"params": holder["state"].ema_params,
                            "batch_stats": holder["state"].ema_batch_stats}),
                           batches[0]["image"]))
    model_flops = (_flops(forward_lowered.cost_analysis()) or float("nan")) * passes
  xla_flops = _flops(lowered.cost_analysis())

  device = jax.devices()[0]
  num_devices = jax.device_count()
  tflops = model_flops / step_s / 1e12
  per_device_peak = settings.peak_tflops or peak_tflops_for(device.device_kind, settings.dtype)
  peak = per_device_peak * num_devices if per_device_peak else None
  return {
      "model": settings.model,
      "segments": settings.segments,
      "budget": settings.budget,
      "mode": settings.mode,
      "batch": settings.batch,
      "image_size": settings.image_size,
      "dtype": settings.dtype,
      "steps": settings.steps,
      "num_params": num_params,
      "compile_s": compile_s,
      "step_time_ms": step_s * 1e3,
      "step_time_ms_min": min(times) * 1e3,
      "step_time_ms_mean": statistics.fmean(times) * 1e3,
      "step_time_ms_spread": (max(times) - min(times)) * 1e3,
      "images_per_sec": settings.batch / step_s,
      "process_cpu_ms_per_step": cpu_s * 1e3,
      "flops_per_step": model_flops,
      "flops_source": flops_source,
      "xla_flops_per_step": xla_flops,
      "tflops": tflops,
      "peak_tflops": peak,
      "mfu": tflops / peak if peak else None,
      "peak_memory_bytes_device": _device_peak_memory_bytes(),
      "peak_memory_bytes_compiled": _compiled_memory_bytes(compiled),
      "conv_formulation": settings.conv_formulation,
      "hlo_ops": _count_ops(lowered),
      "profile_dir": settings.profile_dir,
      "profile_error": profile_error,
      "platform": device.platform,
      "device_kind": device.device_kind,
      "num_devices": num_devices,
      "jax_version": jax.__version__,
      "flax_version": flax.__version__,
      "optax_version": optax.__version__,
      "python_version": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": datetime.date.today().isoformat(),
  }


def format_report(r: dict[str, Any]) -> str:
  """A few human-readable lines of one run's results."""

  def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"

  point = r["model"] + (f" segments={r['segments']}" if r["segments"] is not None else "") + (
      f" budget={r['budget']}" if r["budget"] else "")
  mfu = "n/a (unknown peak for this device)" if r["mfu"] is None else (
      f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s")
  xla = "n/a" if r["xla_flops_per_step"] is None else f"{r['xla_flops_per_step'] / 1e12:.3f}"
  return "\n".join([
      f"{point}: {r['mode']}, batch {r['batch']} x {r['image_size']}^2, {r['dtype']}, "
      f"{r['num_params']:,} params",
      f"device      {r['num_devices']} x {r['device_kind']} ({r['platform']}), jax "
      f"{r['jax_version']}",
      f"compile     {r['compile_s']:.1f} s",
      f"step        {r['step_time_ms']:.2f} ms median (min {r['step_time_ms_min']:.2f}, "
      f"spread {r['step_time_ms_spread']:.2f}) over {r['steps']} steps",
      f"throughput  {r['images_per_sec']:.1f} images/s",
      f"compute     {r['tflops']:.3f} TFLOP/s ({r['flops_source']} model FLOPs "
      f"{r['flops_per_step'] / 1e12:.3f} T/step; XLA counts {xla} T/step); MFU {mfu}",
      f"memory      device peak {gib(r['peak_memory_bytes_device'])}, compiled estimate "
      f"{gib(r['peak_memory_bytes_compiled'])}",
      f"convs       --conv-formulation={r['conv_formulation']}: "
      + ", ".join(f"{n} {op}" for op, n in r["hlo_ops"].items()) + " ops in the program",
  ] + ([f"profile     {r['profile_dir']}" + (f" failed: {r['profile_error']}"
                                              if r["profile_error"] else "")]
       if r["profile_dir"] else []))


def _segments_arg(value: str) -> int | str:
  if value == "depthwise":
    return value
  try:
    return int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{value!r}: a positive int or 'depthwise'") from None


def parse_args(argv: Sequence[str]) -> tuple[BenchmarkSettings, bool]:
  """Command-line flags (both --image-size and --image_size spellings) -> settings, --json."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  d = BenchmarkSettings()
  p.add_argument("--model", default=d.model, help="registry name (xception, inception_v3, ...)")
  p.add_argument("--mode", default=d.mode, choices=MODES)
  p.add_argument("--batch", type=int, default=d.batch, help="global batch size")
  p.add_argument("--image-size", "--image_size", dest="image_size", type=int,
                 default=d.image_size)
  p.add_argument("--steps", type=int, default=d.steps, help="timed steps")
  p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps after compiling")
  p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="compute dtype")
  p.add_argument("--segments", type=_segments_arg, default=None,
                 help="channel segments of every separable conv (int or 'depthwise')")
  p.add_argument("--budget", default=None, choices=("params",),
                 help="'params': widths re-solved to Xception's parameter count")
  p.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int,
                 default=d.num_classes)
  p.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", type=float, default=None,
                 help="per-device peak for MFU, overriding the built-in table")
  p.add_argument("--conv-formulation", "--conv_formulation", dest="conv_formulation",
                 default=d.conv_formulation,
                 help="auto (the platform table in models/layers.py) | native | rewritten | "
                      "KIND=FORM,... with KIND depthwise, grouped, pointwise")
  p.add_argument("--profile-dir", "--profile_dir", dest="profile_dir", default=None,
                 help=f"trace {PROFILE_STEPS} steps after the timed ones into this folder")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  args = p.parse_args(argv)
  as_json = args.json
  del args.json
  settings = BenchmarkSettings(**vars(args))
  try:
    settings.validate()
  except ValueError as e:
    p.error(str(e))  # one line naming the flag, exit status 2
  return settings, as_json


def main(argv: Sequence[str] | None = None) -> None:
  settings, as_json = parse_args(sys.argv[1:] if argv is None else argv)
  result = run_benchmark(settings)
  print(json.dumps(result) if as_json else format_report(result), flush=True)


if __name__ == "__main__":
  main()
