#!/usr/bin/env bash
# Usage: gcp/launch.sh [--dry-run] [--help] [key=value ...]
#
# Starts the same trainer command on every worker of every slice, in the background
# (nohup), logging to ~/k2/train.log on each worker:
#   k2jax train --config ~/k2/config.yaml train.run_dir=gs://BUCKET/runs/RUN \
#     data.path=K2_DATA_PATH [mesh.dcn_data=K2_SLICES] K2_OVERRIDES [key=value ...]
# (mesh.dcn_data only with several slices and no mesh.dcn_* override; later keys win).
# No coordinator flags: jax.distributed finds its peers from the TPU VM metadata.
# A run_dir that holds checkpoints resumes from the latest, so relaunching after a
# preemption is this same command. A worker whose trainer is still alive is left alone.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
parse_common_args "$@"
load_env
require K2_PROJECT K2_ZONE K2_RUN_NAME K2_BUCKET K2_DATA_PATH

read -ra overrides <<<"$K2_OVERRIDES"
for kv in "${overrides[@]}" "${ARGS[@]}"; do
  [[ "$kv" == *=* ]] || die "override '$kv' is not key=value"
done
read -ra remote_env <<<"$K2_REMOTE_ENV"
# Several slices are joined data-parallel over DCN unless the overrides say otherwise.
dcn=()
if ((K2_SLICES > 1)) && [[ " ${overrides[*]} ${ARGS[*]}" != *" mesh.dcn_"* ]]; then
  dcn=("mesh.dcn_data=$K2_SLICES")
fi
train=(k2/venv/bin/k2jax train --config k2/config.yaml
  "train.run_dir=$RUN_DIR" "data.path=$K2_DATA_PATH" "${dcn[@]}" "${overrides[@]}" "${ARGS[@]}")
((${#remote_env[@]} == 0)) || train=(env "${remote_env[@]}" "${train[@]}")

# The worker's shell expands $!, $(...) and $HOSTNAME, hence single quotes.
# shellcheck disable=SC2016
remote='if [ -f k2/train.pid ] && kill -0 "$(cat k2/train.pid)" 2>/dev/null; then'
# shellcheck disable=SC2016
remote+=' echo "k2jax already running on $HOSTNAME"; else nohup '"$(shjoin "${train[@]}")"
# shellcheck disable=SC2016
remote+=' >> k2/train.log 2>&1 < /dev/null & echo $! > k2/train.pid; fi'
ssh_all_nodes "$remote"
if ((DRY_RUN)); then
  log "would launch (launched nothing); logs would be: gcp/logs.sh; checkpoints and TensorBoard: $RUN_DIR"
else
  log "launched; logs: gcp/logs.sh; checkpoints and TensorBoard: $RUN_DIR"
fi
