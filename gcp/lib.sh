# shellcheck shell=bash
# Shared by gcp/*.sh: settings from one env file, --dry-run, and the gcloud wrapper.
# Sourced, never run. Every script's --help is its own header comment.

((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) ||
  { echo "error: gcp/*.sh need bash >= 4.4 (macOS: brew install bash)" >&2; exit 2; }

# Globals the scripts read: GCP_DIR, DRY_RUN, ARGS (non-shared arguments), and from
# load_env QR_NAME, NODES, RUN_DIR, TPU_FLAGS. qr_state sets STATE.
GCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY_RUN=0
ARGS=()

die() { echo "error: $*" >&2; exit 2; }
log() { echo "[k2 $(date -u +%H:%M:%S)] $*" >&2; }

# Print the calling script's header comment (lines 2.. up to the first non-comment).
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# Handles the flags every script shares; the rest stays in ARGS for the script.
parse_common_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# The start of every script that takes no positional argument: its flags, the settings file and
# the settings it needs.  Usage: start_script "$@" -- K2_PROJECT K2_ZONE ...
start_script() {
  local args=()
  while (($#)) && [[ "$1" != -- ]]; do args+=("$1"); shift; done
  (($#)) && shift
  parse_common_args "${args[@]}"
  ((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (see --help)"
  load_env
  require "$@"
}

# K2_ENV=path picks another settings file; the committed gcp/k2.env is the example.
load_env() {
  K2_ENV="${K2_ENV:-$GCP_DIR/k2.env}"
  [[ -r "$K2_ENV" ]] || die "settings file $K2_ENV not found (set K2_ENV=path or copy gcp/k2.env)"
  # shellcheck disable=SC1090  # the user's settings file, shaped like gcp/k2.env
  source "$K2_ENV"
  # Defaults for the optional settings (k2.env documents each).
  K2_CAPACITY="${K2_CAPACITY:-spot}"
  K2_SLICES="${K2_SLICES:-1}"
  K2_CREATE_FLAGS="${K2_CREATE_FLAGS:-}"
  K2_OVERRIDES="${K2_OVERRIDES:-}"
  K2_REMOTE_ENV="${K2_REMOTE_ENV:-}"
  K2_PYTHON="${K2_PYTHON:-3.11}"
  K2_POLL_S="${K2_POLL_S:-30}"
  K2_WAIT_TIMEOUT_S="${K2_WAIT_TIMEOUT_S:-21600}"
  K2_STOP_TIMEOUT_S="${K2_STOP_TIMEOUT_S:-900}"
  K2_MAX_RESTARTS="${K2_MAX_RESTARTS:-50}"
  K2_BABYSIT_POLL_S="${K2_BABYSIT_POLL_S:-300}"
  K2_BABYSIT_MAX_POLLS="${K2_BABYSIT_MAX_POLLS:-50000}"
  local var i
  for var in K2_POLL_S K2_WAIT_TIMEOUT_S K2_STOP_TIMEOUT_S K2_MAX_RESTARTS K2_BABYSIT_POLL_S K2_BABYSIT_MAX_POLLS; do
    [[ "${!var}" =~ ^[0-9]+$ ]] || die "setting $var='${!var}' in $K2_ENV must be a whole number"
  done
  [[ "$K2_SLICES" =~ ^[1-9][0-9]*$ ]] || die "setting K2_SLICES='$K2_SLICES' in $K2_ENV must be a positive integer"
  # The run name names the queued resource and is the node prefix, so the nodes are
  # RUN-0, RUN-1, ... (the --node-count/--node-prefix scheme; one slice uses RUN-0 too).
  QR_NAME="${K2_RUN_NAME:-}"
  # shellcheck disable=SC2034  # read by launch.sh
  RUN_DIR="${K2_BUCKET%/}/runs/${K2_RUN_NAME:-}"
  NODES=()
  for ((i = 0; i < K2_SLICES; i++)); do NODES+=("$QR_NAME-$i"); done
  # Shared by every TPU call. --quiet: never stop at a prompt (babysit runs unattended).
  TPU_FLAGS=("--project=${K2_PROJECT:-}" "--zone=${K2_ZONE:-}" --quiet)
  check_placeholders
  ((DRY_RUN == 0)) || log "dry run: would run the gcloud commands printed below; runs nothing"
}

# gcp/k2.env's example values, which name no real project or bucket: a dry run warns, a real
# run stops before its first gcloud call.
PLACEHOLDERS=(K2_PROJECT=my-gcp-project K2_BUCKET=gs://my-k2-bucket)
check_placeholders() {
  local found=() pair var
  for pair in "${PLACEHOLDERS[@]}"; do
    var="${pair%%=*}"
    [[ "${!var:-}" != "${pair#*=}" ]] || found+=("$var=${!var}")
  done
  [[ "${K2_DATA_PATH:-}" != gs://my-k2-bucket/* ]] || found+=("K2_DATA_PATH=$K2_DATA_PATH")
  [[ "${K2_SOURCE:-}" != gs://my-k2-bucket/* ]] || found+=("K2_SOURCE=$K2_SOURCE")
  ((${#found[@]})) || return 0
  local message="${found[*]} in $K2_ENV: gcp/k2.env's placeholder values; copy it, set your project and bucket, and point K2_ENV at the copy"
  ((DRY_RUN)) && { echo "warning: $message" >&2; return 0; }
  die "$message"
}

# One clear line per missing or malformed setting; stops at the first.
require() {
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "setting $var is empty or missing in $K2_ENV"
  done
  for var in "$@"; do
    case "$var" in
      K2_RUN_NAME) [[ "$K2_RUN_NAME" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
        die "setting K2_RUN_NAME='$K2_RUN_NAME' in $K2_ENV must be lowercase letters, digits and '-' (it names TPU nodes)" ;;
      K2_CAPACITY) [[ "$K2_CAPACITY" =~ ^(spot|reserved|on-demand)$ ]] ||
        die "setting K2_CAPACITY='$K2_CAPACITY' in $K2_ENV must be spot, reserved or on-demand" ;;
      K2_BUCKET | K2_DATA_PATH) [[ "${!var}" == gs://* ]] ||
        die "setting $var='${!var}' in $K2_ENV must be a gs:// path" ;;
    esac
  done
}

# Quote one word so the printed command can be pasted back into a shell.
shq() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

shjoin() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shq "$w")"; done
  printf '%s' "$out"
}

# Every gcloud call goes through here: --dry-run prints it instead of running it.
run_gcloud() {
  if ((DRY_RUN)); then
    echo "gcloud $(shjoin "$@")"
    return 0
  fi
  log "gcloud $(shjoin "$@")"
  gcloud "$@"
}

# Run one shell command on every worker of every slice (sequentially per slice;
# all workers of a slice at once via --worker=all).
ssh_all_nodes() {
  local node
  for node in "${NODES[@]}"; do
    run_gcloud compute tpus tpu-vm ssh "$node" "${TPU_FLAGS[@]}" --worker=all --command="$1"
  done
}

# Sets STATE to the queued resource's state (ACTIVE, SUSPENDED, ...), to NOT_FOUND, or to
# UNKNOWN when gcloud failed for another reason (network, auth): a glitch is never a loss.
# A dry run prints the query and sets DRY_RUN_STATE (the callers say what they would do).
qr_state() {
  local describe=(compute tpus queued-resources describe "$QR_NAME" "${TPU_FLAGS[@]}"
    "--format=value(state.state)") err
  if ((DRY_RUN)); then
    run_gcloud "${describe[@]}"
    STATE=DRY_RUN_STATE
    return 0
  fi
  err="$(mktemp)"
  if STATE="$(gcloud "${describe[@]}" 2>"$err")"; then
    STATE="${STATE:-UNKNOWN}"
  elif grep -qi 'NOT_FOUND\|not found' "$err"; then
    STATE=NOT_FOUND
  else
    log "describe failed: $(tr '\n' ' ' <"$err")"
    STATE=UNKNOWN
  fi
  rm -f "$err"
}
