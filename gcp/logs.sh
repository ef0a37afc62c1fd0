#!/usr/bin/env bash
# Usage: gcp/logs.sh [--dry-run] [--help] [--collect DIR]
#
# Without --collect: follows worker 0's ~/k2/train.log on the first slice (Ctrl-C stops
# watching, not training). Process 0 is the one that logs metrics.
# --collect DIR: copies every worker's log to DIR/NODE/WORKER.log.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common_args "$@"
load_env
require K2_PROJECT K2_ZONE K2_RUN_NAME

if ((${#ARGS[@]} == 0)); then
  run_gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${TPU_FLAGS[@]}" --worker=0 \
    --command="tail -n 200 -F k2/train.log"
  exit 0
fi
[[ "${ARGS[0]}" == --collect && ${#ARGS[@]} == 2 ]] || die "expected --collect DIR (see --help)"
dest="${ARGS[1]}"
for node in "${NODES[@]}"; do
  ((DRY_RUN)) || mkdir -p "$dest/$node"
  # --output-directory writes one WORKER.log per worker.
  run_gcloud compute tpus tpu-vm ssh "$node" "${TPU_FLAGS[@]}" --worker=all \
    --command="cat k2/train.log" --output-directory="$dest/$node"
done
