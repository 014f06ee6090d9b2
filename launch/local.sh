#!/usr/bin/env bash
# N processes of the main job on this machine: the multi-host code path, without a cluster.
#
#   launch/local.sh N [main args...]
#   launch/local.sh 2 --config=configs/quickstart.py:runlocal --workdir=/tmp/xj_2proc
#   DEVICES_PER_PROCESS=2 launch/local.sh 4 --config=configs/quickstart.py --workdir=/tmp/xj
#
# Every process runs `python -m xception_jax.main [main args...] --coordinator_address=
# localhost:PORT --num_processes=N --process_id=i` (PORT: a free one). xception_jax.distributed
# then switches JAX to its gloo CPU collectives, so the CPU devices of all N processes form one
# global mesh, exactly as the hosts of a TPU slice or a GPU cluster do: each process feeds its
# own part of the global batch, and XLA all-reduces the gradients across processes.
#
# Environment:
#   DEVICES_PER_PROCESS=K  CPU devices each process exposes (sets XLA_FLAGS'
#                          --xla_force_host_platform_device_count=K). Unset: XLA_FLAGS as given.
#   JAX_PLATFORMS          default "cpu" (N processes on one GPU box would all claim every GPU).
#   PYTHON                 interpreter, default "python" (the active virtual environment's).
#
# Output lines are prefixed with "[process i]". Ctrl-C or SIGTERM is passed on to every process
# as SIGTERM (the main job saves a checkpoint and stops; rerun the same command to resume); a
# second Ctrl-C kills them. (The processes themselves ignore the terminal's SIGINT, as every
# background job of a script does, so that they all stop the same way at the same step.) If one process fails, the others are killed (they would otherwise
# wait forever in a collective). Exit status: 0 if all succeeded; 75 if the run saved a
# checkpoint and stopped for preemption (SIGTERM; rerun to resume: see xception_jax/preemption.py);
# else the first failure's (130 / 143 if the processes were stopped without saving).
set -uo pipefail

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
fi
num_processes="$1"
shift
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: N (number of processes) must be a positive integer, got '$num_processes'." >&2
  usage
fi
for arg in "$@"; do
  case "$arg" in
    --coordinator_address*|--num_processes*|--process_id*)
      echo "launch/local.sh: '$arg' is set by this script; remove it from the main args." >&2
      exit 2 ;;
  esac
done

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# The package and configs/ import from the repository root, wherever this is called from.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  if ! [[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: DEVICES_PER_PROCESS must be a positive integer, got '$DEVICES_PER_PROCESS'." >&2
    exit 2
  fi
  # Drop any device count already in XLA_FLAGS, keep the other flags.
  flags=""
  for flag in ${XLA_FLAGS:-}; do
    [[ "$flag" == --xla_force_host_platform_device_count=* ]] || flags+="$flag "
  done
  export XLA_FLAGS="${flags}--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
fi

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" || {
  echo "launch/local.sh: could not run '$python' to pick a free port." >&2
  exit 2
}
coordinator="localhost:$port"
echo "launch/local.sh: $num_processes processes, coordinator" \
     "$coordinator${DEVICES_PER_PROCESS:+, $DEVICES_PER_PROCESS CPU devices each}" >&2

pids=()
interrupted=0
signal_status=0
on_signal() {  # installed before the processes start, so that no signal finds it missing
  signal_status=$1
  interrupted=$((interrupted + 1))
  if ((${#pids[@]} == 0)); then
    exit "$signal_status"
  elif ((interrupted == 1)); then
    echo "launch/local.sh: stopping all processes (SIGTERM; again to kill)." >&2
    kill -TERM "${pids[@]}" 2>/dev/null
  else
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# Each process writes into a FIFO read by its own line prefixer (python -u: unbuffered; sed -u
# passes lines on at once). FIFOs rather than >(...) process substitution, whose pipe would also
# leak into the job's own child processes as an extra file descriptor.
fifo_dir="$(mktemp -d)"
trap 'rm -rf "$fifo_dir"' EXIT
prefixers=()
for ((i = 0; i < num_processes; i++)); do
  mkfifo "$fifo_dir/$i"
  sed -u "s/^/[process $i] /" < "$fifo_dir/$i" &
  prefixers+=("$!")
  # The FIFO is opened here, before the process exists, and closed here right after it starts:
  # the prefixer then sees end-of-file exactly when the process's output closes, even if the
  # process is killed before it could open the FIFO itself (else the prefixer would wait forever).
  exec {output}>"$fifo_dir/$i"
  "$python" -u -m xception_jax.main "$@" --coordinator_address="$coordinator" \
      --num_processes="$num_processes" --process_id="$i" >&"$output" 2>&1 &
  pids+=("$!")
  exec {output}>&-
done

status=0
saved=0
preempted_status=75  # xception_jax.preemption.PREEMPTED_EXIT_STATUS: saved, resumable
remaining=("${pids[@]}")
while ((${#remaining[@]} > 0)); do
  finished=""
  wait -n -p finished "${remaining[@]}"
  rc=$?
  if [[ -z "${finished:-}" ]]; then
    if ((rc == 127)); then
      # "no such job": bash already reaped them (killed above); keep only those still running.
      still=()
      for pid in "${remaining[@]}"; do
        kill -0 "$pid" 2>/dev/null && still+=("$pid")
      done
      remaining=("${still[@]+"${still[@]}"}")
    fi
    continue  # otherwise wait was interrupted by a signal; the trap has acted, keep waiting
  fi
  still=()
  for pid in "${remaining[@]}"; do
    [[ "$pid" == "$finished" ]] || still+=("$pid")
  done
  remaining=("${still[@]+"${still[@]}"}")
  if ((rc == preempted_status)); then
    saved=1  # stopped at the step all processes agreed on; the others are saving it too
  elif ((rc != 0 && status == 0)); then
    status=$rc
    if ((${#remaining[@]} > 0 && interrupted == 0)); then
      echo "launch/local.sh: process $finished exited with status $rc; killing the others." >&2
      kill -KILL "${remaining[@]}" 2>/dev/null
    fi
  fi
done
wait "${prefixers[@]}"  # the last lines of output
if ((status == 0 && saved)); then
  status=$preempted_status  # passed through: the caller (a scheduler, a sweep) can rerun
elif ((status == 0 && signal_status != 0)); then
  status=$signal_status  # stopped on request: not a success, so that callers do not go on
fi
exit "$status"
