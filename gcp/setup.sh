#!/usr/bin/env bash
# Usage: gcp/setup.sh [--dry-run] [--help]
#
# On every worker of every slice: creates ~/k2/venv and installs k2jax with the
# `tpu` extra from K2_SOURCE, then puts the config K2_CONFIG at ~/k2/config.yaml.
#   K2_SOURCE=gs://BUCKET/wheels/k2jax-0.1.0-py3-none-any.whl  (a wheel built with
#             `python -m build --wheel`, copied to each worker first)
#   K2_SOURCE=git+https://github.com/ORG/k2jax@REF              (any pip URL)
#   K2_CONFIG=configs/k2-65b.yaml (a local file, copied with scp) or gs://... (fetched
#             on the worker).
# Safe to rerun: an existing venv is reused and k2jax is reinstalled.
# Settings: K2_ENV (default gcp/k2.env).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
start_script "$@" -- K2_PROJECT K2_ZONE K2_RUN_NAME K2_SOURCE K2_CONFIG

case "$K2_SOURCE" in
  gs://*.whl)
    wheel="k2/$(basename "$K2_SOURCE")"
    # pip cannot read gs://, so the wheel is copied next to the venv first.
    fetch="gcloud storage cp $(shq "$K2_SOURCE") $(shq "$wheel"); "
    # \$HOME stays literal: the worker's shell expands it.
    spec="k2jax[tpu] @ file://\$HOME/$wheel" ;;
  *://*) fetch="" spec="k2jax[tpu] @ $K2_SOURCE" ;;
  *) die "setting K2_SOURCE='$K2_SOURCE' in $K2_ENV must be gs://.../k2jax-*.whl or a pip URL (git+https://...@REF)" ;;
esac
case "$K2_CONFIG" in
  gs://*) get_config="gcloud storage cp $(shq "$K2_CONFIG") k2/config.yaml" ;;
  *) [[ -f "$K2_CONFIG" ]] || die "setting K2_CONFIG: file $K2_CONFIG not found"
     get_config="" ;;
esac

# The TPU VM images ship Ubuntu 22.04's Python 3.10 and k2jax needs >= 3.11, so uv
# (a pip-installable binary) fetches a standalone Python K2_PYTHON for the venv.
# Images whose Python is marked externally managed (PEP 668) need the second pip form.
pip_uv="python3 -m pip install --user --quiet --upgrade uv"
remote="set -e; mkdir -p k2; $pip_uv || $pip_uv --break-system-packages"
remote+="; [ -x k2/venv/bin/python ] || ~/.local/bin/uv venv --python $(shq "$K2_PYTHON") k2/venv"
remote+="; ${fetch}~/.local/bin/uv pip install --python k2/venv/bin/python --reinstall-package k2jax \"$spec\""
remote+="; k2/venv/bin/k2jax --help > /dev/null${get_config:+; $get_config}"
ssh_all_nodes "$remote"

if [[ -z "$get_config" ]]; then
  for node in "${NODES[@]}"; do
    run_gcloud compute tpus tpu-vm scp "$K2_CONFIG" "$node:k2/config.yaml" "${TPU_FLAGS[@]}" --worker=all
  done
fi
