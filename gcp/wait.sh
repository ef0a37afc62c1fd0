#!/usr/bin/env bash
# Usage: gcp/wait.sh [--dry-run] [--help]
#
# Polls the queued resource every K2_POLL_S seconds until it is ACTIVE.
# Fails (exit 1) when it becomes FAILED, SUSPENDING, SUSPENDED or DELETING, is not
# found, or is not ACTIVE within K2_WAIT_TIMEOUT_S seconds (spot capacity can queue
# for hours: size the timeout to your patience).
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_RUN_NAME

# A count of polls, not a clock, bounds the loop, so K2_POLL_S=0 still terminates.
max_polls=$((K2_WAIT_TIMEOUT_S / (K2_POLL_S > 0 ? K2_POLL_S : 1) + 1))
if ((DRY_RUN)); then
  qr_state
  log "would run that query every ${K2_POLL_S}s until it answers ACTIVE for $QR_NAME (at most $max_polls polls, K2_WAIT_TIMEOUT_S=${K2_WAIT_TIMEOUT_S}s)"
  exit 0
fi
for ((poll = 1; poll <= max_polls; poll++)); do
  qr_state
  case "$STATE" in
    ACTIVE) log "$QR_NAME is ACTIVE"; exit 0 ;;
    FAILED | SUSPENDING | SUSPENDED | DELETING | NOT_FOUND)
      echo "error: queued resource $QR_NAME is $STATE" >&2; exit 1 ;;
    *) log "$QR_NAME is $STATE (poll $poll/$max_polls)" ;;
  esac
  sleep "$K2_POLL_S"
done
echo "error: queued resource $QR_NAME not ACTIVE after ${K2_WAIT_TIMEOUT_S}s (K2_WAIT_TIMEOUT_S)" >&2
exit 1
