#!/usr/bin/env bash
# Usage: gcp/babysit.sh [--dry-run] [--help]
#
# Keeps a (spot) run alive: every K2_BABYSIT_POLL_S seconds it reads the queued
# resource's state. ACTIVE or still queueing: nothing to do. Preempted or lost
# (SUSPENDING, SUSPENDED, FAILED, not found): delete it, create it again, wait for
# ACTIVE, set up the workers and launch the same command, which resumes from the
# latest checkpoint in the run dir. Started with no queued resource, it does the
# first create too (that counts as a restart). A failed gcloud query is retried at
# the next poll, never taken for a preemption.
# Gives up (exit 1) after K2_MAX_RESTARTS restarts; exits 0 after K2_BABYSIT_MAX_POLLS
# polls. It watches the slices, not the trainer: a trainer that exits on a healthy
# slice (finished, or crashed) is not relaunched.
# --dry-run prints the polling query and one recovery cycle.
# Run it where it outlives your laptop session, e.g. under tmux on a small VM.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_ACCELERATOR K2_RUNTIME K2_RUN_NAME K2_SLICES K2_CAPACITY \
  K2_BUCKET K2_DATA_PATH K2_SOURCE K2_CONFIG

flags=()
((DRY_RUN)) && flags=(--dry-run)

# One recovery cycle; any failing step fails the cycle, and the next poll starts over.
recover() {
  if [[ "$1" != NOT_FOUND ]]; then "$GCP_DIR/delete.sh" "${flags[@]}" || return 1; fi
  "$GCP_DIR/create.sh" "${flags[@]}" &&
    "$GCP_DIR/wait.sh" "${flags[@]}" &&
    "$GCP_DIR/setup.sh" "${flags[@]}" &&
    "$GCP_DIR/launch.sh" "${flags[@]}"
}

if ((DRY_RUN)); then
  qr_state
  log "would run that query every ${K2_BABYSIT_POLL_S}s (at most $K2_BABYSIT_MAX_POLLS polls)"
  echo "# would run, when the state is SUSPENDING, SUSPENDED or FAILED (or not found: without the delete):"
  recover SUSPENDED
  exit 0
fi

restarts=0
for ((poll = 1; poll <= K2_BABYSIT_MAX_POLLS; poll++)); do
  qr_state
  case "$STATE" in
    SUSPENDING | SUSPENDED | FAILED | NOT_FOUND)
      if ((restarts >= K2_MAX_RESTARTS)); then
        echo "error: $QR_NAME is $STATE and K2_MAX_RESTARTS=$K2_MAX_RESTARTS restarts are used up" >&2
        exit 1
      fi
      restarts=$((restarts + 1))
      log "$QR_NAME is $STATE: restart $restarts/$K2_MAX_RESTARTS"
      recover "$STATE" || log "restart $restarts failed; trying again after the next poll" ;;
    *) log "$QR_NAME is $STATE (poll $poll/$K2_BABYSIT_MAX_POLLS, restarts $restarts)" ;;
  esac
  sleep "$K2_BABYSIT_POLL_S"
done
log "stopping after K2_BABYSIT_MAX_POLLS=$K2_BABYSIT_MAX_POLLS polls"
