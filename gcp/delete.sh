#!/usr/bin/env bash
# Usage: gcp/delete.sh [--dry-run] [--help]
#
# Deletes the queued resource and its nodes (--force), ending the billing.
# Stop the trainer first (gcp/stop.sh) or the steps since the last checkpoint are lost.
# Checkpoints, TensorBoard files and data stay in GCS.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_RUN_NAME

run_gcloud compute tpus queued-resources delete "$QR_NAME" "${TPU_FLAGS[@]}" --force
