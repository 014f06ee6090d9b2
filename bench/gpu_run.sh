#!/usr/bin/env bash
# One GPU session's measurements, staged: bench/gpu_run.sh [--smoke] [--only=S1,S2] [--deadline=S] PLAN
#
# PLAN (one per GPU session: each is planned to about 8 minutes on an H100 and cut at --deadline,
# default 570 s; a session has 15 minutes of device time, start-up included):
#   first      issue 12: the `gpu` tests, then Xception train and infer, bf16, batch 128 at 299:
#              ours, timm eager, timm compiled; resume under the deterministic-ops XLA flag;
#              profile summaries for missed targets.
#   spectrum   issue 13: the training step at G = 1, depthwise, 64, ..., 2 (--budget=params, as the
#              code picks the formulation), then the grouped convolutions forced to the rewritten
#              (CPU) formulation at G = 64, ..., 2; a profile of the worst G if its target is missed.
#   inception  issue 13: Inception V3 train and infer against timm; on Xception (depthwise), the
#              depthwise and 1x1 convolutions and the max-pool backward forced to their rewritten
#              (CPU) forms beside the default.
#
# Stage budgets, seconds (the budget is the stage's `timeout`; in parentheses what it took on an
# H200 on 2026-11-28, `first` plan, bench/results/gpu_first_log_h200_2026-11-28.txt, or an estimate
# from those: a process that imports jax, builds the state and compiles our Xception training step
# takes 90-100 s (compile 45-51 s), an inference step 42 s (compile 10 s); a further point in the
# same process (bench/run_points.py) about 60 s):
#   first:     env 60 (14), gpu-tests 240 (153), xception-train-ours 120 (93-102),
#              xception-train-eager 60 (45), xception-train-compile 150 (91), xception-infer-ours
#              75 (42), xception-infer-eager 45 (15), xception-infer-compile 120 (38),
#              deterministic-resume 90 (78), profile 45 (1): 9.6 minutes, so the run of
#              2026-11-28 reached its deadline in deterministic-resume and ran it (with the
#              profile) in a second call.
#   spectrum:  env 60, spectrum-auto 420 (8 points, est. 100 + 7 x 60 = 520: the deadline cuts the
#              last points; the order puts the most informative first), profile-worst 90 (only if
#              the target is missed), spectrum-rewritten 300 (6 points): two sessions, the second
#              `--only=spectrum-rewritten` (compile time of the rewritten grouped convolutions on a
#              GPU is the unknown).
#   inception: env 60, inception_v3-{train,infer}-{ours,eager,compile} 120/60/150/75/45/120 (est.
#              as Xception: 100/45/91/42/15/38), xception-formulations 220 (3 points: native,
#              max pool's CPU backward, 1x1 rewritten; est. 220: cut), spectrum-depthwise-rewritten
#              60 (est. 100: cut), profile 45: est. 11 minutes,
#              so plan on `--only=xception-formulations,spectrum-depthwise-rewritten,profile` in a
#              second call made at once (a machine stays warm 30 s after a call).
#
# Each stage runs under its own `timeout` (its budget, cut to what is left before the deadline;
# stages that would start with under 20 s left are recorded as skipped) and appends to $OUT as it
# finishes, so a run cut off at any point returns everything done so far. $OUT (at most 8 files):
#   results.jsonl  every record: stage status, environment, the gpu tests' measurements, every
#                  benchmark result, profile summaries (`bench/gpu_report.py` reads it)
#   log.txt        all output but pytest's;  pytest.txt  the gpu tests' output
#   summary.md     bench/gpu_report.py's tables (sections 1 and 2, verdicts), written at the end
#   profile.md     top-15 kernel tables of the traces summarised
# Traces and wheels installed go to $WORK (default /tmp/xj_gpu_run), never to $OUT.
#
# --smoke runs every stage on this machine's CPU at toy sizes (batch 2, 75x75, 1 timed step, the
# gpu tests with XJ_GPU_TEST_BACKEND=cpu), without deadline, so the GPU run is not where this
# script's bugs are found. PY runs our code (default python3), TORCH_PY the timm side (default
# $PY); on the GPU machine both are its python3. Wheels in .whl/ (ml_collections: BENCHMARKS.md
# section 5) are installed with `pip --target` into $WORK/site first.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)

SMOKE=0 ONLY="" PLAN="" DEADLINE_S=570 SMOKE_FACTOR=20
usage() { sed -n '2,4p' "$0" >&2; exit 2; }
for arg; do
  case $arg in
    --smoke) SMOKE=1 ;;
    --only=*) ONLY=${arg#--only=} ;;
    --deadline=*) DEADLINE_S=${arg#--deadline=} ;;
    first|spectrum|inception) PLAN=$arg ;;
    *) echo "gpu_run.sh: unknown argument '$arg'" >&2; usage ;;
  esac
done
[[ -n $PLAN ]] || usage

OUT=${OUT:-/tmp/xj_gpu_run_out}
WORK=${WORK:-/tmp/xj_gpu_run}
PY=${PY:-python3}
TORCH_PY=${TORCH_PY:-$PY}
mkdir -p "$OUT" "$WORK"
RESULTS=$OUT/results.jsonl LOG=$OUT/log.txt PYTEST=$OUT/pytest.txt PROFILE=$OUT/profile.md
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if (( SMOKE )); then
  SIZE=(--batch=2 --image-size=75 --steps=1 --warmup=1 --dtype=bfloat16)
  POINT_SIZE="--batch=2 --image_size=75 --steps=1 --warmup=1 --dtype=bfloat16"
  TIMM_DEVICE=(--device=cpu)
  export JAX_PLATFORMS=cpu XJ_GPU_TEST_BACKEND=cpu
else
  SIZE=(--batch=128 --image-size=299 --steps=10 --warmup=3 --dtype=bfloat16)
  POINT_SIZE="--batch=128 --image_size=299 --steps=6 --warmup=2 --dtype=bfloat16"
  TIMM_DEVICE=(--device=cuda)
fi

now() { date +%s; }
START=$(now)
record() { printf '%s\n' "$1" >> "$RESULTS"; }
say() { echo "=== $* ($(date -u +%H:%M:%S), $(( $(now) - START ))s in)" | tee -a "$LOG"; }
wanted() { [[ -z $ONLY || $1 == env || ",$ONLY," == *",$1,"* ]]; }

# stage NAME BUDGET_S COMMAND...: runs COMMAND under timeout, output to the log, status record.
stage() {
  local name=$1 budget=$2 left limit rc=0 t0 status
  shift 2
  wanted "$name" || return 0
  left=$(( START + DEADLINE_S - $(now) ))
  if (( SMOKE )); then
    limit=$(( budget * SMOKE_FACTOR ))
  else
    limit=$(( budget < left ? budget : left ))
  fi
  if (( !SMOKE && left < 20 )); then
    record "{\"stage\": \"$name\", \"plan\": \"$PLAN\", \"status\": \"skipped (${left} s left of the ${DEADLINE_S} s deadline)\", \"limit_s\": 0}"
    say "$name: skipped, ${left} s left"
    return 0
  fi
  say "$name: start, limit ${limit} s"
  t0=$(now)
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "{\"stage\": \"$name\", \"plan\": \"$PLAN\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(( $(now) - t0 )), \"limit_s\": $limit}"
  say "$name: $status after $(( $(now) - t0 )) s"
}

# --- Set-up: wheels the machine lacks (not a stage: everything after needs it).
say "plan $PLAN, smoke=$SMOKE, deadline ${DEADLINE_S} s, OUT=$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=$WORK/site:$PYTHONPATH
    say "installed $(ls .whl | tr '\n' ' ')into $WORK/site"
  else
    say "wheel install FAILED (see log)"
  fi
fi

cat > "$WORK/env_ours.py" <<'EOF'
import importlib.metadata as md, json, platform, shutil, subprocess, sys
def rec(what, value):
  print(json.dumps({"stage": "env", "what": what, "value": value}), flush=True)
if shutil.which("nvidia-smi"):
  query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
  rec("nvidia-smi", subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True,
                                   text=True, check=False).stdout.strip())
else:
  rec("nvidia-smi", "not found")
rec("python (ours)", f"{platform.python_version()} {sys.executable}")
versions = {}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
             "orbax-checkpoint", "chex", "numpy", "ml-collections", "absl-py", "tensorstore"):
  try:
    versions[name] = md.version(name)
  except md.PackageNotFoundError:
    pass
rec("packages (ours)", versions)
import jax
rec("jax devices", [f"{d.platform}: {d.device_kind}" for d in jax.devices()])
for module in ("xception_jax.train", "xception_jax.export", "xception_jax.tools.benchmark",
               "configs.imagenet"):
  try:
    __import__(module)
    rec(f"import {module}", "ok")
  except Exception as e:  # the log says which package to carry
    rec(f"import {module}", f"{type(e).__name__}: {e}")
EOF
cat > "$WORK/env_torch.py" <<'EOF'
import json, platform
def rec(what, value):
  print(json.dumps({"stage": "env", "what": what, "value": value}), flush=True)
import torch, timm
rec("torch side", {"python": platform.python_version(), "torch": torch.__version__,
                   "timm": timm.__version__, "cuda": torch.version.cuda,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
EOF
env_stages() {
  stage env 60 bash -c "'$PY' '$WORK/env_ours.py' >> '$RESULTS'; '$TORCH_PY' '$WORK/env_torch.py' >> '$RESULTS'"
}

# timm_stage MODEL MODE IMPL BUDGET [OURS_ARGS]: one compare_timm measurement, appended as it ends.
timm_stage() {
  local model=$1 mode=$2 impl=$3 budget=$4 ours_args=${5:-}
  stage "$model-$mode-$impl" "$budget" "$TORCH_PY" bench/compare_timm.py --models="$model" \
    --modes="$mode" --impls="$impl" "${SIZE[@]}" "${TIMM_DEVICE[@]}" --ours-python="$PY" \
    --ours-args="$ours_args" --jsonl-out="$RESULTS"
}

# versus_timm MODEL: the six measurements of section 1 (train first), ours traced for profiles.
versus_timm() {
  local model=$1
  timm_stage "$model" train ours 120 "--profile_dir=$WORK/prof_${model}_train"
  timm_stage "$model" train eager 60
  timm_stage "$model" train compile 150
  timm_stage "$model" infer ours 75 "--profile_dir=$WORK/prof_${model}_infer"
  timm_stage "$model" infer eager 45
  timm_stage "$model" infer compile 120
}

# profile_stage: summarises the traces of our measurements that missed their target (all of
# them in --smoke, to exercise the summariser).
profile_stage() {
  local traces
  if (( SMOKE )); then
    traces=$(ls -d "$WORK"/prof_* 2> /dev/null)
  else
    traces=$("$PY" bench/gpu_report.py "$RESULTS" --profile-traces)
  fi
  [[ -n $traces ]] || { say "profile: every target met (or nothing traced), no summary"; return 0; }
  for trace in $traces; do
    stage "profile" 45 bash -c "'$PY' bench/profile_summary.py '$trace' --top=15 \
      --jsonl-out='$RESULTS' >> '$PROFILE'; echo >> '$PROFILE'"
  done
}

SPECTRUM_COMMON="--model=xception --budget=params --mode=train $POINT_SIZE"

case $PLAN in
  first)
    env_stages
    stage gpu-tests 240 bash -c "XJ_GPU_TEST_RECORD='$RESULTS' '$PY' -m pytest -q -m gpu tests/gpu \
      -rA --durations=20 > '$PYTEST' 2>&1"
    versus_timm xception
    stage deterministic-resume 90 bash -c "echo '=== XLA_FLAGS=--xla_gpu_deterministic_ops=true' \
      >> '$PYTEST'; XLA_FLAGS=--xla_gpu_deterministic_ops=true XJ_GPU_TEST_RECORD='$RESULTS' \
      '$PY' -m pytest -q -m gpu tests/gpu/test_training.py -k resume -rA >> '$PYTEST' 2>&1"
    profile_stage
    ;;
  spectrum)
    env_stages
    # Endpoints first (the ratio needs both), then the largest G, which the CPU found slowest.
    stage spectrum-auto 420 "$PY" bench/run_points.py --tag=spectrum-auto --jsonl-out="$RESULTS" \
      --common="$SPECTRUM_COMMON" --segments=1 --segments=depthwise --segments=64 \
      --segments=32 --segments=16 --segments=8 --segments=4 --segments=2
    worst=$("$PY" bench/gpu_report.py "$RESULTS" --profile-rerun)
    if (( SMOKE )) && [[ -z $worst ]]; then worst="$SPECTRUM_COMMON --segments=64"; fi
    if [[ -n $worst ]] && wanted profile-worst; then
      stage profile-worst 90 "$PY" bench/run_points.py --tag=profile-worst --jsonl-out="$RESULTS" \
        "$worst --profile_dir=$WORK/prof_worst"
      stage profile 45 bash -c "'$PY' bench/profile_summary.py '$WORK/prof_worst' --top=15 \
        --jsonl-out='$RESULTS' >> '$PROFILE'"
    fi
    stage spectrum-rewritten 300 "$PY" bench/run_points.py --tag=spectrum-rewritten \
      --jsonl-out="$RESULTS" --common="$SPECTRUM_COMMON" --segments=64:grouped=rewritten \
      --segments=32:grouped=rewritten --segments=16:grouped=rewritten \
      --segments=8:grouped=rewritten --segments=4:grouped=rewritten \
      --segments=2:grouped=rewritten
    ;;
  inception)
    env_stages
    versus_timm inception_v3
    # Xception (depthwise): as the code picks, then depthwise and 1x1 forced to their rewrites.
    stage xception-formulations 220 "$PY" bench/run_points.py --tag=xception-formulations \
      --jsonl-out="$RESULTS" --common="$SPECTRUM_COMMON" --segments=depthwise \
      --segments=depthwise:max_pool=rewritten --segments=depthwise:pointwise=rewritten
    stage spectrum-depthwise-rewritten 60 "$PY" bench/run_points.py --tag=spectrum-rewritten \
      --jsonl-out="$RESULTS" --common="$SPECTRUM_COMMON" --segments=depthwise:depthwise=rewritten
    profile_stage
    ;;
esac

"$PY" bench/gpu_report.py "$RESULTS" > "$OUT/summary.md" 2>> "$LOG"
say "done; summary in $OUT/summary.md"
cat "$OUT/summary.md"
