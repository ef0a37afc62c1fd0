#!/usr/bin/env bash
# Usage: gcp/stop.sh [--dry-run] [--help]
#
# Sends SIGTERM to the trainer on every worker of every slice, so that it writes a
# checkpoint and exits, then waits up to K2_STOP_TIMEOUT_S seconds for each to exit.
# All slices get the signal before any wait: the checkpoint is a collective over all
# hosts, so no host may be left training while the others save.
# The slices keep running (and billing): gcp/delete.sh releases them.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_RUN_NAME

# For the worker's shell, hence single quotes.
# shellcheck disable=SC2016
ssh_all_nodes 'if [ -f k2/train.pid ]; then kill -TERM "$(cat k2/train.pid)" 2>/dev/null || true; fi'
wait_exit="[ -f k2/train.pid ] || exit 0; pid=\$(cat k2/train.pid)"
wait_exit+="; for _ in \$(seq $K2_STOP_TIMEOUT_S); do kill -0 \$pid 2>/dev/null || exit 0; sleep 1; done"
wait_exit+="; echo \"trainer \$pid on \$(hostname) still running after ${K2_STOP_TIMEOUT_S}s\"; exit 1"
ssh_all_nodes "$wait_exit"
