#!/usr/bin/env bash
# The main job on a SLURM GPU cluster: writes a batch script and submits it with sbatch.
#
#   launch/slurm.sh [options] -- [main args...]
#   launch/slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=72:00:00 -- \
#       --config=configs/imagenet.py --workdir=/shared/runs/xception \
#       --config.data_dir=/shared/tensorflow_datasets
#
# In the job, `srun` starts one process per GPU (--per=gpu, the default) or one per node
# (--per=host, each process driving all GPUs of its node). Every process runs
#   python -m xception_jax.main [main args...] --coordinator_address=FIRST_NODE:PORT
#       --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID
# with FIRST_NODE the first host of $SLURM_JOB_NODELIST (process 0 runs there) and PORT fixed per
# job, and JAX_LOCAL_DEVICE_IDS set to the GPUs the process owns ($SLURM_LOCALID per GPU, all of
# the node's per host). JAX could detect all of this from SLURM's environment by itself; the
# explicit flags make the job's log say exactly what ran, and per host they keep JAX from
# claiming only GPU $SLURM_LOCALID (its default under SLURM). The workdir and the code must be
# on a file system every node sees; rerunning the same command resumes from the workdir.
#
# Preemption and time limits: the job asks SLURM for SIGTERM to the batch shell 120 s before its
# time limit (#SBATCH --signal=B:TERM@120, see --signal-before=) and may be requeued
# (#SBATCH --requeue). The batch shell passes SIGTERM on to srun, which passes it to every
# process; they agree on a step, save it, and exit with status 75 ("saved, resumable", see
# xception_jax/preemption.py). On status 75 the batch script runs `scontrol requeue
# $SLURM_JOB_ID`: the job goes back to the queue and, when it starts again, resumes from that
# checkpoint. A job preempted by SLURM itself (PreemptMode=REQUEUE) is requeued by SLURM.
#
# Options:
#   --nodes=N            nodes (default 1)
#   --gpus-per-node=G    GPUs per node (default 8)
#   --per=gpu|host       one process per GPU (default) or per node
#   --partition=P --account=A --qos=Q --time=T   the usual sbatch settings (time default 24:00:00)
#   --cpus-per-task=C    CPU cores per process (input pipeline threads); default: the cluster's
#   --job-name=NAME      default xception_jax
#   --python=PATH        interpreter on the nodes (default: `python` on PATH here, made absolute)
#   --port=PORT          coordinator port (default: 61440 + job id % 4096, as JAX picks it)
#   --log-dir=DIR        batch script and job log folder (default: REPO/logs/slurm)
#   --sbatch=ARG         an extra sbatch option, repeatable (e.g. --sbatch=--constraint=a100)
#   --signal-before=S    seconds before the time limit that SIGTERM comes (default 120)
#   --no-requeue         neither #SBATCH --requeue nor a requeue on status 75
#   --dry-run            print the batch script and the sbatch command instead of submitting
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage_lines="2,6"
# shellcheck source=launch/common.sh
source "$repo_root/launch/common.sh"

positive_int() {  # name value
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'."
}

nodes=1 gpus_per_node=8 per=gpu partition="" account="" qos="" time_limit="24:00:00"
cpus_per_task="" job_name="xception_jax" python="" port="" log_dir="$repo_root/logs/slurm"
extra_sbatch=() dry_run=0 signal_before=120 requeue=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; break ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus_per_node="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --qos=*) qos="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --cpus-per-task=*) cpus_per_task="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log-dir=*) log_dir="${1#*=}" ;;
    --sbatch=*) extra_sbatch+=("${1#*=}") ;;
    --signal-before=*) signal_before="${1#*=}" ;;
    --no-requeue) requeue=0 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (valid: --nodes= --gpus-per-node= --per= --partition= --account=" \
           "--qos= --time= --cpus-per-task= --job-name= --python= --port= --log-dir= --sbatch=" \
           "--signal-before= --no-requeue --dry-run; main args go after '--')." ;;
  esac
  shift
done
main_args=("$@")

positive_int --nodes "$nodes"
positive_int --gpus-per-node "$gpus_per_node"
[[ -z "$cpus_per_task" ]] || positive_int --cpus-per-task "$cpus_per_task"
[[ -z "$port" ]] || positive_int --port "$port"
positive_int --signal-before "$signal_before"
case "$per" in
  gpu) tasks_per_node="$gpus_per_node" ;;
  host) tasks_per_node=1 ;;
  *) die "--per must be 'gpu' (one process per GPU) or 'host' (one per node), got '$per'." ;;
esac
[[ "$job_name" =~ ^[A-Za-z0-9_.+=,-]+$ ]] || die "--job-name='$job_name': use letters, digits and _.+=,- only."
have_workdir=0
for arg in "${main_args[@]+"${main_args[@]}"}"; do
  case "$arg" in
    --workdir=*) have_workdir=1 ;;
    --coordinator_address*|--num_processes*|--process_id*)
      die "'$arg' is set by the batch script from SLURM's environment; remove it from the main args." ;;
  esac
done
((have_workdir)) || die "the main args (after '--') need --workdir=DIR (and --config=...)."
if [[ -z "$python" ]]; then
  python="$(command -v python || command -v python3 || true)"
  [[ -n "$python" ]] || die "no python on PATH; pass --python=PATH (the interpreter on the nodes)."
fi
[[ "$python" == /* ]] || python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")"
[[ "$log_dir" == /* ]] || log_dir="$(pwd)/$log_dir"

if [[ "$per" == gpu ]]; then
  local_device_ids='$SLURM_LOCALID'
else
  local_device_ids="$(seq -s, 0 $((gpus_per_node - 1)))"
fi
if [[ -n "$port" ]]; then
  port_expr="$port"
else
  port_expr='$((61440 + SLURM_JOB_ID % 4096))'
fi

sbatch_lines=(
  "--job-name=$job_name"
  "--nodes=$nodes"
  "--ntasks-per-node=$tasks_per_node"
  "--gpus-per-node=$gpus_per_node"
  "--time=$time_limit"
  "--output=$log_dir/%x-%j.out"
  "--signal=B:TERM@$signal_before"
)
((requeue == 0)) || sbatch_lines+=("--requeue")
[[ -z "$cpus_per_task" ]] || sbatch_lines+=("--cpus-per-task=$cpus_per_task")
[[ -z "$partition" ]] || sbatch_lines+=("--partition=$partition")
[[ -z "$account" ]] || sbatch_lines+=("--account=$account")
[[ -z "$qos" ]] || sbatch_lines+=("--qos=$qos")
sbatch_lines+=("${extra_sbatch[@]+"${extra_sbatch[@]}"}")

# The per-task command: bash -c with the interpreter as $0 and the main args as "$@", so the
# main args need no second level of quoting; the $SLURM_* variables expand inside each task.
task_command='export JAX_LOCAL_DEVICE_IDS='"$local_device_ids"'; exec "$0" -m xception_jax.main "$@" --coordinator_address="$XJ_COORDINATOR" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'

script="#!/bin/bash"$'\n'
for line in "${sbatch_lines[@]}"; do
  script+="#SBATCH $(quote "$line")"$'\n'
done
script+="# Written by launch/slurm.sh: one process per $per ($tasks_per_node per node) on $nodes node(s)."
script+=$'\n'"set -euo pipefail
cd $(quote "$(pwd)")  # where launch/slurm.sh ran: relative --config/--workdir paths mean the same
export PYTHONPATH=$(quote "$repo_root")\${PYTHONPATH:+:\$PYTHONPATH}
# Process 0 runs on the first node of the allocation: the coordinator.
XJ_COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | sed -n 1p):$port_expr\"
export XJ_COORDINATOR
echo \"coordinator \$XJ_COORDINATOR, \$SLURM_NTASKS processes\" >&2
# SIGTERM (--signal=B:TERM@...) reaches this shell only: pass it on to srun, which passes it to
# every process. The processes save the step they agree on and exit with 75 together.
srun_pid=\"\" term=0
trap 'term=1; echo \"SIGTERM: the processes save a checkpoint and stop\" >&2; [[ -z \"\$srun_pid\" ]] || kill -TERM \"\$srun_pid\" 2>/dev/null' TERM
srun --kill-on-bad-exit=1 bash -c $(quote "$task_command") $(quote_all "$python" "${main_args[@]}") &
srun_pid=\$!
((term == 0)) || kill -TERM \"\$srun_pid\" 2>/dev/null  # the signal came while srun started
while kill -0 \"\$srun_pid\" 2>/dev/null; do  # a trap makes wait return early: wait again
  wait \"\$srun_pid\" || true
done
status=0
wait \"\$srun_pid\" || status=\$?  # bash keeps the exit status of a finished job
"
if ((requeue)); then
  script+="if ((status == 75)); then  # saved, resumable (xception_jax/preemption.py)
  echo \"Saved for preemption: requeueing job \$SLURM_JOB_ID\" >&2
  scontrol requeue \"\$SLURM_JOB_ID\"
fi
"
fi
script+="exit \"\$status\"
"

script_path="$log_dir/$job_name.sbatch"
if ((dry_run)); then
  printf '# ---- batch script %s ----\n%s# ---- submitted with ----\n' "$script_path" "$script"
  quote_all sbatch --parsable "$script_path"
  echo
  exit 0
fi

command -v sbatch > /dev/null || die "sbatch not found: run this on a SLURM login node."
mkdir -p "$log_dir"
printf '%s' "$script" > "$script_path"
job_id="$(sbatch --parsable "$script_path")"
echo "Submitted job $job_id ($script_path); log: $log_dir/$job_name-${job_id%%;*}.out"
