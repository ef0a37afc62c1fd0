#!/usr/bin/env bash
# Usage: gcp/create.sh [--dry-run] [--help]
#
# Requests the TPU slice(s) as one queued resource named K2_RUN_NAME.
# One slice: node K2_RUN_NAME-0. Several (K2_SLICES > 1): one multislice request
# (--node-count/--node-prefix) whose nodes K2_RUN_NAME-0, -1, ... are provisioned
# together and joined over DCN; JAX reads the MEGASCALE settings that the queued
# resource writes into each VM's metadata, so none are set here.
# Capacity: K2_CAPACITY=spot (--spot), reserved (--reserved) or on-demand.
# Returns once the request is queued; gcp/wait.sh waits for ACTIVE.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_ACCELERATOR K2_RUNTIME K2_RUN_NAME K2_SLICES K2_CAPACITY

create=(compute tpus queued-resources create "$QR_NAME" "${TPU_FLAGS[@]}"
  "--accelerator-type=$K2_ACCELERATOR" "--runtime-version=$K2_RUNTIME")
if ((K2_SLICES == 1)); then
  # --node-count must be > 1, so one slice names its single node explicitly.
  create+=("--node-id=${NODES[0]}")
else
  create+=("--node-count=$K2_SLICES" "--node-prefix=$QR_NAME")
fi
case "$K2_CAPACITY" in
  spot) create+=(--spot) ;;
  reserved) create+=(--reserved) ;;
  on-demand) ;;
esac
# Site-specific flags (network, service account, ...) as written in the env file.
read -ra extra <<<"$K2_CREATE_FLAGS"
create+=("${extra[@]}")

run_gcloud "${create[@]}"
