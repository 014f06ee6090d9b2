"""Step-time benchmark of the real training step and of inference, on synthetic device data.

  python -m xception_jax.tools.benchmark --model=xception --mode=train --batch=128 \
      --image_size=299 --steps=30 --dtype=bfloat16 [--segments=4 --budget=params] [--json]

Why a tool of its own: a sweep over the spectrum is dozens of ImageNet-scale runs, so the cost of
one step decides what research is affordable, and it must be measured on exactly what training
runs. This tool therefore builds the step with the training job's own functions
(`models.create_model`, `optim.create_optimizer`, `steps.create_train_state`,
`steps.make_train_step`: loss, gradients, L2 decay, SGD momentum, EMA of weights and batch
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
  tflops, mfu      model FLOPs per step / median step time, and that / the device's peak
                   (tools/measurements.py PEAK_TFLOPS or --peak_tflops; null for CPUs). Model
                   FLOPs (`flops_source`, BENCHMARKS.md "How to read the numbers"): 'analytic'
                   (`models.costs`, Xception family) or 'xla_forward' (XLA's count of the
                   forward pass), x 3 for training; `xla_flops_per_step` counts the whole step.
  peak_memory_*    device memory_stats() peak where the backend reports it (GPU, TPU), and
                   XLA's compiled memory analysis (arguments + outputs - aliased + temporaries)
                   everywhere. The device peak is the process's: in a process that ran other
                   configurations first it is the largest so far.
  conv_formulation, hlo_ops  --conv_formulation as given (auto = the platform table in
                   models/layers.py) and the count of convolution and dot_general ops in the
                   lowered step, which shows which formulation was compiled.

--conv_formulation=native|rewritten|KIND=FORM,... forces the depthwise, grouped or pointwise
convolutions (or max pooling) to the native op or to their rewritten form on any platform (`layers.
conv_formulation`), to measure one against the other on the device at hand. --profile_dir=DIR
traces PROFILE_STEPS more steps after the timed ones with `jax.profiler.trace` (TensorBoard /
xprof format; `bench/profile_summary.py DIR` lists the top kernels).

No TensorFlow is imported on this path. It does import `configs` (the recipe) and therefore
`ml_collections`, which `xception_jax.train` and `xception_jax.optim` import as well.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import datetime
import json
import os
import statistics
import time
from typing import Any
from typing import NamedTuple

from absl import flags
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from configs import imagenet
from xception_jax import cli
from xception_jax import config_check
from xception_jax import data
from xception_jax import host_memory
from xception_jax import models
from xception_jax import optim
from xception_jax import steps
from xception_jax import train
from xception_jax import versions
from xception_jax.data import synthetic
from xception_jax.models import costs
from xception_jax.models import inception_v3
from xception_jax.models import layers
from xception_jax.models import xception_arch
from xception_jax.tools import measurements

MODES = ("train", "infer")
DTYPES = config_check.TRAIN_DTYPES  # the compute dtypes training accepts
# Weight decay per model in the paper's ImageNet recipe (configs/imagenet.py,
# configs/inception_v3_imagenet.py); other models get Xception's.
_WEIGHT_DECAY = {"inception_v3": 4e-5, "inception_v3_tiny": 4e-5}
_DEFAULT_WEIGHT_DECAY = 1e-5
NUM_INPUT_BATCHES = 3  # distinct device batches rotated through the timed steps


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
        raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
    if self.warmup < 0:
      raise ValueError(f"--warmup={self.warmup} must be >= 0")
    if self.budget not in (None, "params"):
      raise ValueError(f"--budget={self.budget!r}; valid: 'params' or unset")
    try:
      layers.parse_conv_formulation(self.conv_formulation)
    except ValueError as e:
      raise ValueError(f"--conv_formulation: {e}") from None
    if self.peak_tflops is not None and not self.peak_tflops > 0:
      raise ValueError(f"--peak_tflops={self.peak_tflops} must be > 0 (TFLOP/s of one device)")
    if self.model not in models.list_models():
      raise ValueError(f"--model={self.model!r}; valid: {', '.join(models.list_models())}")
    smallest = (
      inception_v3.MIN_IMAGE_SIZE
      if self.model.startswith("inception")
      else xception_arch.MIN_IMAGE_SIZE
    )
    if self.image_size < smallest:
      raise ValueError(f"--image_size={self.image_size}: {self.model} needs >= {smallest}")
    try:  # segment counts that do not divide a layer's channels fail here, not after compiling
      models.create(
        self.model,
        num_classes=self.num_classes,
        **({"segments": self.segments} if self.segments is not None else {}),
        **({"budget": self.budget} if self.budget else {}),
      )
    except (ValueError, TypeError) as e:
      flag = "--segments" if self.segments is not None else "--budget"
      raise ValueError(
        f"{flag}={self.segments if self.segments is not None else self.budget}: {e}"
      ) from None


def build_config(settings: BenchmarkSettings):
  """The paper's ImageNet recipe at the benchmark's batch, size, dtype and spectrum point."""
  config = imagenet.recipe(
    settings.model, weight_decay=_WEIGHT_DECAY.get(settings.model, _DEFAULT_WEIGHT_DECAY)
  )
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


def _analytic_forward_flops(settings: BenchmarkSettings) -> float | None:
  """2 x multiply-adds of one image's forward pass, for the Xception family; else None."""
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


def run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
  """Builds, compiles and times one configuration; returns the measurements (see module doc)."""
  settings.validate()
  with layers.conv_formulation(settings.conv_formulation):
    return _run_benchmark(settings)


class StepSetup(NamedTuple):
  """A benchmark point's training job, built by the job's own functions, not yet compiled."""

  mesh: jax.sharding.Mesh
  model: Any
  state: Any  # the sharded TrainState; the step donates it
  train_step: Any  # jitted exactly as train.train_and_evaluate jits it
  batches: list[dict[str, jax.Array]]  # NUM_INPUT_BATCHES synthetic device batches


def build_step_setup(settings: BenchmarkSettings) -> StepSetup:
  """Model, optimizer, sharded state, jitted training step and device batches for `settings`
  (also what bench/profile_step.py profiles)."""
  config = build_config(settings)
  mesh = train.make_mesh(config)
  config_check.validate(config, mesh.shape["data"], jax.process_count())
  model = models.create_model(config, settings.num_classes)
  steps_per_epoch = synthetic.NUM_TRAIN_EXAMPLES / settings.batch
  tx, schedule = optim.create_optimizer(config, steps_per_epoch, config.total_steps)
  state, state_shardings = steps.create_train_state(
    model, tx, settings.image_size, mesh, config.seed
  )
  loss_fn = steps.make_loss_fn("softmax", settings.num_classes, config.label_smoothing)
  train_step = steps.jit_train_step(
    steps.make_train_step(config, model, tx, schedule, loss_fn, multi_label=False),
    state_shardings,
    mesh,
  )
  keys = jax.random.split(jax.random.PRNGKey(1), NUM_INPUT_BATCHES)
  sharding = NamedSharding(mesh, P("data"))
  batches = [
    synthetic.make_batch(
      k, settings.batch, settings.image_size, settings.num_classes, sharding=sharding
    )
    for k in keys
  ]
  jax.block_until_ready(batches)
  return StepSetup(mesh, model, state, train_step, batches)


def _run_benchmark(settings: BenchmarkSettings) -> dict[str, Any]:
  setup = build_step_setup(settings)
  model, state, batches = setup.model, setup.state, setup.batches
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  data_sharding = NamedSharding(setup.mesh, P("data"))
  replicated = NamedSharding(setup.mesh, P())

  def infer(variables, images):
    return model.apply(variables, images, train=False)

  infer_jit = jax.jit(infer, in_shardings=(replicated, data_sharding), out_shardings=replicated)
  variables = {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
  passes = 3 if settings.mode == "train" else 1
  forward = _analytic_forward_flops(settings)
  flops_source = "analytic" if forward is not None else "xla_forward"
  if forward is None:  # XLA's count of the eval-mode forward pass (lowered, not compiled)
    counted = measurements.flops(infer_jit.lower(variables, batches[0]["image"]).cost_analysis())
    forward = (counted or float("nan")) / settings.batch
  model_flops = forward * settings.batch * passes

  start = time.perf_counter()
  if settings.mode == "train":
    lowered = setup.train_step.lower(state, batches[0])
  else:
    lowered = infer_jit.lower(variables, batches[0]["image"])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  if settings.mode == "train":
    holder = {"state": state}
    del state, variables, setup  # donated from the first step on

    def run_one(i):
      holder["state"], metrics = compiled(holder["state"], batches[i % NUM_INPUT_BATCHES])
      return holder["state"], metrics
  else:
    holder = {"state": None}
    del state, setup  # keep only the EMA weights alive, so peak memory is that of inference

    def run_one(i):
      return compiled(variables, batches[i % NUM_INPUT_BATCHES]["image"])

  times, cpu_s = measurements.time_steps(run_one, settings.steps, settings.warmup)
  step_s = statistics.median(times)
  profile_error = (
    measurements.profile(run_one, settings.warmup + settings.steps, settings.profile_dir)
    if settings.profile_dir
    else None
  )

  xla_flops = measurements.flops(lowered.cost_analysis())

  device = jax.devices()[0]
  num_devices = jax.device_count()
  tflops = model_flops / step_s / 1e12
  per_device_peak = settings.peak_tflops or measurements.peak_tflops_for(
    device.device_kind, settings.dtype
  )
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
    "peak_memory_bytes_device": measurements.device_peak_memory_bytes(),
    "peak_memory_bytes_compiled": measurements.compiled_memory_bytes(compiled),
    "conv_formulation": settings.conv_formulation,
    "hlo_ops": measurements.count_ops(lowered),
    "profile_dir": settings.profile_dir,
    "profile_error": profile_error,
    "platform": device.platform,
    "device_kind": device.device_kind,
    "num_devices": num_devices,
    **{
      f"{name}_version": version
      for name, version in versions.library_versions(("jax", "flax", "optax", "python")).items()
    },
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "date": datetime.date.today().isoformat(),
  }


def format_report(r: dict[str, Any]) -> str:
  """A few human-readable lines of one run's results."""

  def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"

  point = (
    r["model"]
    + (f" segments={r['segments']}" if r["segments"] is not None else "")
    + (f" budget={r['budget']}" if r["budget"] else "")
  )
  mfu = (
    "n/a (unknown peak for this device)"
    if r["mfu"] is None
    else (f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s")
  )
  xla = "n/a" if r["xla_flops_per_step"] is None else f"{r['xla_flops_per_step'] / 1e12:.3f}"
  return "\n".join(
    [
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
      f"convs       --conv_formulation={r['conv_formulation']}: "
      + ", ".join(f"{n} {op}" for op, n in r["hlo_ops"].items())
      + " ops in the program",
    ]
    + (
      [
        f"profile     {r['profile_dir']}"
        + (f" failed: {r['profile_error']}" if r["profile_error"] else "")
      ]
      if r["profile_dir"]
      else []
    )
  )


PROG = "python -m xception_jax.tools.benchmark"
_DEFAULTS = BenchmarkSettings()
FLAGS = flags.FlagValues()
flags.DEFINE_string(
  "model", _DEFAULTS.model, "Registry name (xception, inception_v3, ...).", flag_values=FLAGS
)
flags.DEFINE_enum(
  "mode", _DEFAULTS.mode, MODES, "The training step or inference.", flag_values=FLAGS
)
flags.DEFINE_integer("batch", _DEFAULTS.batch, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer(
  "image_size", _DEFAULTS.image_size, "Input height and width.", flag_values=FLAGS
)
flags.DEFINE_integer("steps", _DEFAULTS.steps, "Timed steps.", flag_values=FLAGS)
flags.DEFINE_integer(
  "warmup", _DEFAULTS.warmup, "Untimed steps after compiling.", flag_values=FLAGS
)
flags.DEFINE_enum("dtype", _DEFAULTS.dtype, DTYPES, "Compute dtype.", flag_values=FLAGS)
flags.DEFINE_string(
  "segments",
  None,
  "Channel segments of every separable conv (int or 'depthwise').",
  flag_values=FLAGS,
)
flags.DEFINE_enum(
  "budget",
  None,
  ["params"],
  "'params': widths re-solved to Xception's parameter count.",
  flag_values=FLAGS,
)
flags.DEFINE_integer("num_classes", _DEFAULTS.num_classes, "Classifier outputs.", flag_values=FLAGS)
flags.DEFINE_float(
  "peak_tflops", None, "Per-device peak for MFU, overriding the built-in table.", flag_values=FLAGS
)
flags.DEFINE_string(
  "conv_formulation",
  _DEFAULTS.conv_formulation,
  "auto (the platform table "
  "in models/layers.py) | native | rewritten | KIND=FORM,... with KIND "
  "depthwise, grouped, pointwise, max_pool.",
  flag_values=FLAGS,
)
flags.DEFINE_string(
  "profile_dir",
  None,
  f"Trace {measurements.PROFILE_STEPS} steps after the timed ones into this folder.",
  flag_values=FLAGS,
)
flags.DEFINE_bool("json", False, "Print one JSON object instead of text.", flag_values=FLAGS)


def parse_args(argv: Sequence[str] | None) -> tuple[BenchmarkSettings, bool]:
  """Command-line flags -> the validated settings and --json; exit status 2 naming a bad flag."""
  positional = cli.parse(FLAGS, argv, PROG, __doc__.split("\n\n")[0])
  if positional:
    cli.usage_error(PROG, f"unexpected arguments {positional}")
  try:
    segments = models.parse_segments(FLAGS.segments)
  except ValueError as e:
    cli.usage_error(PROG, f"--segments: {e}")
  if isinstance(segments, dict):
    cli.usage_error(
      PROG,
      f"--segments={FLAGS.segments}: per-flow settings are not benchmarked; "
      "give one int or 'depthwise'.",
    )
  settings = BenchmarkSettings(
    **{
      field.name: FLAGS[field.name].value
      for field in dataclasses.fields(BenchmarkSettings)
      if field.name != "segments"
    },
    segments=segments,
  )
  try:
    settings.validate()
  except ValueError as e:
    cli.usage_error(PROG, str(e))  # one line naming the flag
  return settings, FLAGS.json


def main(argv: Sequence[str] | None = None) -> None:
  settings, as_json = parse_args(argv)
  kept = host_memory.keep_freed_host_memory()  # before JAX starts its CPU client
  result = {**run_benchmark(settings), "host_memory_kept": kept}
  print(json.dumps(result) if as_json else format_report(result), flush=True)


if __name__ == "__main__":
  main()
