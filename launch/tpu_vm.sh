#!/usr/bin/env bash
# The main job on every worker of a Cloud TPU VM: one host (v5e-8, v4-8) or a multi-host slice.
#
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [options] -- [main args...]
#   launch/tpu_vm.sh --tpu=my-v4-32 --zone=us-central2-b -- \
#       --config=configs/imagenet.py --workdir=/mnt/shared/xception/run1 \
#       --config.data_dir=gs://my-bucket/tensorflow_datasets
#
# Three steps, each one `gcloud compute tpus tpu-vm` command over --worker=all:
#   1. sync: the repository's files (`git ls-files`: tracked and untracked-but-not-ignored, so
#      no .venv, data or run folders) as one tarball, scp'd to every worker and unpacked into
#      REMOTE_DIR (over the previous copy; nothing there is deleted);
#   2. install: a virtual environment REMOTE_DIR/.venv with requirements.txt and jax[tpu] (in
#      requirements.txt's version range);
#   3. run: `python -m xception_jax.main [main args...]` on all workers at once. Every worker is
#      one JAX process; JAX finds the other workers of the slice by itself (Cloud TPU metadata),
#      so no coordinator flags are needed. Rerunning the same command resumes from the workdir.
# The workdir must be one folder that every worker sees (checkpoints are written by all of them).
#
# Options:
#   --tpu=NAME         TPU VM name (required)
#   --zone=ZONE        its zone (required)
#   --project=PROJECT  Google Cloud project (default: gcloud's configured one)
#   --remote-dir=DIR   code folder on the workers, relative to the home folder or absolute
#                      (default: xception_jax)
#   --python=PYTHON    interpreter on the workers that creates the venv (default: python3);
#                      jax 0.10/0.11 needs Python >= 3.11 (3.12 for jax 0.11)
#   --skip-sync        do not copy the code (it is already there)
#   --skip-install     do not create or update the virtual environment
#   --detach           start the job under nohup (logs: REMOTE_DIR/logs/main-HOSTNAME.log) and
#                      return at once; without it the ssh session streams every worker's output
#   --dry-run          print the commands, one per line, shell-quoted, without running them
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage_lines="2,5"
# shellcheck source=launch/common.sh
source "$repo_root/launch/common.sh"

tpu="" zone="" project="" remote_dir="xception_jax" remote_python="python3"
sync=1 install=1 detach=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; break ;;
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --remote-dir=*) remote_dir="${1#*=}" ;;
    --python=*) remote_python="${1#*=}" ;;
    --skip-sync) sync=0 ;;
    --skip-install) install=0 ;;
    --detach) detach=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (valid: --tpu= --zone= --project= --remote-dir= --python=" \
           "--skip-sync --skip-install --detach --dry-run; main args go after '--')." ;;
  esac
  shift
done
main_args=("$@")
[[ -n "$tpu" ]] || die "--tpu=NAME is required (the TPU VM's name, see 'gcloud compute tpus tpu-vm list')."
[[ -n "$zone" ]] || die "--zone=ZONE is required (the TPU VM's zone)."
[[ -n "$remote_dir" ]] || die "--remote-dir must not be empty."
check_main_args ": TPU workers find each other by themselves; remove it from the main args." \
  "${main_args[@]+"${main_args[@]}"}"

gcloud_common=(--zone="$zone")
[[ -z "$project" ]] || gcloud_common+=(--project="$project")

jax_requirement="$(grep -E '^jax[<>=! ]' "$repo_root/requirements.txt" | head -n 1 | tr -d ' ')"
[[ -n "$jax_requirement" ]] || die "no 'jax...' line in $repo_root/requirements.txt."
jax_tpu_requirement="jax[tpu]${jax_requirement#jax}"

tarball_name="xception_jax-src.tar.gz"
local_tarball="${TMPDIR:-/tmp}/xception_jax-src-$$.tar.gz"
qdir="$(quote "$remote_dir")"

commands=()  # each entry: one command line, already quoted
if ((sync)); then
  commands+=("git -C $(quote "$repo_root") ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$local_tarball") -C $(quote "$repo_root") --null -T -")
  commands+=("$(quote_all gcloud compute tpus tpu-vm scp "$local_tarball" "$tpu:$tarball_name" \
      "${gcloud_common[@]}" --worker=all)")
  # Unpacked over what is there: nothing is deleted (a relative --workdir may live in there).
  unpack="mkdir -p $qdir && tar -xzf $tarball_name -C $qdir && rm $tarball_name"
  commands+=("$(quote_all gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_common[@]}" --worker=all \
      --command "$unpack")")
fi
if ((install)); then
  setup="cd $qdir && $(quote "$remote_python") -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -r requirements.txt $(quote "$jax_tpu_requirement")"
  commands+=("$(quote_all gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_common[@]}" --worker=all \
      --command "$setup")")
fi
main="python -m xception_jax.main $(quote_all "${main_args[@]}")"
if ((detach)); then
  run="cd $qdir && . .venv/bin/activate && mkdir -p logs && nohup $main > logs/main-\$(hostname).log 2>&1 < /dev/null &"
else
  run="cd $qdir && . .venv/bin/activate && $main"
fi
commands+=("$(quote_all gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_common[@]}" --worker=all \
    --command "$run")")

if ((dry_run)); then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

command -v gcloud > /dev/null || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)."
if ((sync)); then
  git -C "$repo_root" rev-parse --git-dir > /dev/null 2>&1 \
      || die "$repo_root is not a git checkout; the sync step lists its files with git ls-files."
  trap 'rm -f "$local_tarball"' EXIT
fi
for command in "${commands[@]}"; do
  echo "+ $command" >&2
  bash -c "set -euo pipefail; $command"
done
