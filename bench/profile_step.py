"""Per-op CPU profile of one training step: ours (XLA:CPU) or timm's (PyTorch), by layer kind.

  python bench/profile_step.py --impl=ours --batch=32 --image-size=71      # jax environment
  python bench/profile_step.py --impl=timm --batch=32 --image-size=71      # torch + timm env

Why: BENCHMARKS.md section 6 compares where the two frameworks spend the Xception training step
(SGD momentum, weight decay, EMA, as `bench/compare_timm.py` times it), op by op, forward and
backward apart. Both sides are grouped into the same layer kinds: stem 3x3 convs, depthwise 3x3,
pointwise 1x1, shortcut 1x1 stride 2, batch norm, ReLU, max pool, head, and the rest (loss,
optimizer, EMA, metrics).

ours: `jax.profiler` traces --steps compiled steps (the benchmark tool's step, built by the
  training job's functions); each executed XLA thunk (fusion, dot, ...) is mapped to its HLO
  instruction and, through the `op_name` metadata JAX writes (`transpose(jvp(...))` marks the
  backward pass), to a layer and a kind. Times are thread milliseconds: the sum over XLA's
  threads, so up to 2x the wall time on 2 cores. Fusions mix ops of neighbouring layers; each is
  counted once, under the op its metadata names (the fusion's root).
timm: `torch.profiler` over --steps steps of timm's `legacy_xception`; each aten op's self time
  (which, on CPU, is wall time of an op that uses all intra-op threads), with convolutions
  split by their weight's shape. Backward ops are those run by the autograd engine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

KINDS = (
  "stem conv",
  "depthwise 3x3",
  "grouped 3x3",
  "pointwise 1x1",
  "shortcut 1x1/2",
  "batch norm",
  "relu",
  "max pool",
  "head",
  "residual add",
  "other model",
  "loss/optimizer/EMA/metrics",
)


def _kind_of_op_name(op_name: str) -> str:
  """Layer kind of a JAX op_name such as jit(train_step)/transpose(jvp(Xception))/block2_..."""
  if "Xception" not in op_name:
    return "loss/optimizer/EMA/metrics"
  layer = op_name.split("Xception)")[-1]
  if "select_and_scatter" in layer or "reduce_window" in layer or "max_pool" in layer:
    return "max pool"
  if re.search(r"_bn(/|$)", layer):
    return "batch norm"
  if "/spatial/" in layer:
    return "depthwise 3x3"
  if "/pointwise/" in layer:
    return "pointwise 1x1"
  if "_shortcut/" in layer:
    return "shortcut 1x1/2"
  if "block1_conv" in layer:
    return "stem conv"
  if "predictions" in layer or "reduce_sum" in layer.split("/")[-1] and "/" not in layer[1:]:
    return "head"
  if "relu" in layer or layer.endswith("/max") or "select_n" in layer or "/gt" in layer:
    return "relu"
  if layer.endswith("/add") or layer.endswith("/add_any"):
    return "residual add"
  return "other model"


def _hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Entry-computation instruction name -> (shape, op_name). A fusion without an op_name takes
  the first model op_name in its body, anything else still without one its nearest user's
  (layout copies, iotas)."""
  bodies = {
    m.group(1): m.group(2)
    for m in re.finditer(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M)
  }
  entry = hlo_text[hlo_text.index("\nENTRY") :]
  info, users = {}, collections.defaultdict(list)
  for line in entry.splitlines()[1:]:
    m = re.match(r"\s+(?:ROOT )?%(\S+) = (.*?) (\S+?)\((.*)", line)
    if not m:
      continue
    name, shape, _, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called and (not op_name or "Xception" not in op_name.group(1)):
      # A fusion named after a root outside the model (e.g. the optimizer's add of the weight
      # decay, fused into a weight-gradient product) is attributed to the model op inside.
      op_name = (
        re.search(r'op_name="([^"]*Xception[^"]*)"', bodies.get(called.group(1), "")) or op_name
      )
    info[name] = (shape, op_name.group(1) if op_name else "")
    for operand in re.findall(r"%([\w.\-]+)", rest.split("calls=")[0]):
      users[operand].append(name)

  def resolve(name, depth=0):
    shape, op_name = info.get(name, ("?", ""))
    if op_name or depth > 4:
      return op_name
    for user in users.get(name, ()):
      found = resolve(user, depth + 1)
      if found:
        return found
    return ""

  return {name: (info[name][0], resolve(name)) for name in info}


def profile_ours(args: argparse.Namespace) -> dict[str, Any]:
  """Traces the compiled training step; thread-ms per (direction, kind) and per thunk."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
  from xception_jax import host_memory  # pylint: disable=g-import-not-at-top

  host_memory.keep_freed_host_memory()  # as the benchmark tool and the training command do
  import jax  # pylint: disable=g-import-not-at-top

  from xception_jax.tools import benchmark  # pylint: disable=g-import-not-at-top

  # The benchmark tool's training step, built as tools/benchmark.run_benchmark builds it.
  settings = benchmark.BenchmarkSettings(
    model="xception",
    mode="train",
    batch=args.batch,
    image_size=args.image_size,
    steps=args.steps,
    warmup=args.warmup,
    dtype=args.dtype,
  )
  setup = benchmark.build_step_setup(settings)
  batches = setup.batches
  compiled = setup.train_step.lower(setup.state, batches[0]).compile()
  holder = {"state": setup.state}
  del setup  # the step donates the state

  def run_one(i):
    holder["state"], metrics = compiled(holder["state"], batches[i % 3])
    return metrics

  index = _hlo_index(compiled.as_text())
  for i in range(args.warmup):
    jax.block_until_ready(run_one(i))
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(args.steps):
      jax.block_until_ready(run_one(args.warmup + i))
  wall_ms = (time.perf_counter() - start) / args.steps * 1e3
  trace = glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz"))[0]
  with gzip.open(trace) as f:
    events = json.load(f)["traceEvents"]
  per_thunk = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in index:
      per_thunk[e["name"]] += e.get("dur", 0) / 1e3 / args.steps
  rows = collections.Counter()
  top = []
  for name, ms in per_thunk.most_common():
    shape, op_name = index[name]
    direction = "backward" if "transpose(" in op_name else "forward"
    kind = _kind_of_op_name(op_name)
    if kind == "loss/optimizer/EMA/metrics":
      direction = "-"
    rows[(direction, kind)] += ms
    top.append(
      {
        "thunk": name,
        "ms": ms,
        "shape": shape.split("{")[0],
        "direction": direction,
        "kind": kind,
        "op": op_name.replace("jit(train_step)/", ""),
      }
    )
  return {
    "impl": "ours",
    "wall_ms_per_step_traced": wall_ms,
    "unit": "thread ms per step",
    "rows": [{"direction": d, "kind": k, "ms": ms} for (d, k), ms in rows.items()],
    "top": top,
    "jax_version": jax.__version__,
  }


def _torch_kind(name: str, shapes: Any) -> str | None:
  """Layer kind of an aten op from its name and input shapes (convolutions by weight shape)."""
  if "convolution" in name:
    # (input, weight, ...) forward; (grad_output, input, weight, ...) backward.
    weight = shapes[2 if "backward" in name else 1] if len(shapes) > 2 else []
    if len(weight) != 4:
      return "other model"
    _, in_c, kh, _ = weight
    if kh == 3 and in_c == 1:
      return "depthwise 3x3"
    if kh == 3:
      return "stem conv"
    return "pointwise 1x1"
  if "batch_norm" in name:
    return "batch norm"
  if "threshold" in name or "relu" in name or "clamp" in name:
    return "relu"
  if "max_pool" in name:
    return "max pool"
  if "addmm" in name or name in ("aten::mm", "aten::mean", "aten::adaptive_avg_pool2d"):
    return "head"
  return None


def profile_timm(args: argparse.Namespace) -> dict[str, Any]:
  """torch.profiler over timm's legacy_xception training step (compare_timm.py's recipe)."""
  import timm  # pylint: disable=g-import-not-at-top
  import timm.utils  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from torch.profiler import profile  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  net = timm.create_model("legacy_xception", pretrained=False, num_classes=1000)
  net = net.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.045, momentum=0.9, weight_decay=1e-5)
  ema = timm.utils.ModelEmaV3(net, decay=0.9999)
  batches = [
    (
      torch.rand(args.batch, 3, args.image_size, args.image_size)
      .mul_(2)
      .sub_(1)
      .contiguous(memory_format=torch.channels_last),
      torch.randint(0, 1000, (args.batch,)),
    )
    for _ in range(3)
  ]

  def step(i):
    x, y = batches[i % 3]
    with torch.profiler.record_function("## forward ##"):
      loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function("## backward ##"):
      loss.backward()
    with torch.profiler.record_function("## optimizer+EMA ##"):
      optimizer.step()
      ema.update(net)

  for i in range(args.warmup):
    step(i)
  start = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for i in range(args.steps):
      step(args.warmup + i)
  wall_ms = (time.perf_counter() - start) / args.steps * 1e3
  rows = collections.Counter()
  top = collections.Counter()
  # Direction from the enclosing record_function range (time containment).
  ranges = [
    (e.name, e.time_range.start, e.time_range.end)
    for e in prof.events()
    if e.name.startswith("## ")
  ]
  for e in prof.events():
    if e.name.startswith("## ") or not e.name.startswith("aten::"):
      continue
    self_ms = e.self_cpu_time_total / 1e3 / args.steps
    if self_ms <= 0:
      continue
    where = next((n for n, s, t in ranges if s <= e.time_range.start <= t), "")
    kind = _torch_kind(e.name, e.input_shapes or [])
    if "optimizer" in where or not where or "softmax" in e.name or "nll_loss" in e.name:
      direction, kind = "-", "loss/optimizer/EMA/metrics"
    else:
      direction = "backward" if "backward" in where else "forward"
      kind = kind or ("residual add" if e.name in ("aten::add", "aten::add_") else "other model")
    rows[(direction, kind)] += self_ms
    top[(e.name, direction, kind)] += self_ms
  return {
    "impl": "timm",
    "wall_ms_per_step_traced": wall_ms,
    "unit": "ms per step (aten self time; ops use all intra-op threads)",
    "rows": [{"direction": d, "kind": k, "ms": ms} for (d, k), ms in rows.items()],
    "top": [{"op": n, "direction": d, "kind": k, "ms": ms} for (n, d, k), ms in top.most_common()],
    "torch_version": torch.__version__,
    "timm_version": timm.__version__,
    "threads": torch.get_num_threads(),
  }


def format_profile(result: dict[str, Any], top: int) -> str:
  """A markdown table of the (direction, kind) rows, largest first, and the `top` ops."""
  total = sum(r["ms"] for r in result["rows"])
  lines = [
    f"{result['impl']}: {result['unit']}; total {total:.0f}, traced wall "
    f"{result['wall_ms_per_step_traced']:.0f} ms/step",
    "",
    "| direction | kind | ms | share |",
    "|---|---|---:|---:|",
  ]
  for r in sorted(result["rows"], key=lambda r: -r["ms"]):
    lines.append(
      f"| {r['direction']} | {r['kind']} | {r['ms']:.1f} | {100 * r['ms'] / total:.1f}% |"
    )
  lines += ["", "top ops:"]
  for t in result["top"][:top]:
    lines.append(
      f"  {t['ms']:8.1f}  {t['direction']:8s} {t['kind']:22s} "
      f"{t.get('thunk', '')} {t.get('shape', '')} {t['op'][:90]}"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--impl", choices=("ours", "timm"), required=True)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=71)
  p.add_argument("--steps", type=int, default=3, help="profiled steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--top", type=int, default=25, help="how many single ops to list")
  p.add_argument("--json-out", default="", help="also write the result here")
  args = p.parse_args(argv)
  if args.impl == "timm" and args.dtype != "float32":
    p.error("--impl=timm profiles float32 only")
  result = profile_ours(args) if args.impl == "ours" else profile_timm(args)
  result.update(
    batch=args.batch,
    image_size=args.image_size,
    dtype=args.dtype,
    steps=args.steps,
    date=time.strftime("%Y-%m-%d"),
  )
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=1)
  print(format_profile(result, args.top), flush=True)


if __name__ == "__main__":
  sys.exit(main())
