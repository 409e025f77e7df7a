#!/usr/bin/env bash
# Submit a raydpo training run to a Ray cluster and wait for it; exits with the job's status.
#   cluster/submit.sh CONFIG.yaml [key=value ...]
# RAYDPO_COMMAND: the raydpo command the job runs (train, the default, or online).
# RAY_ADDRESS: the cluster's dashboard (default http://127.0.0.1:8265). RAY_AUTH_TOKEN, when the
# cluster uses token auth (Ray 2.60's default for local clusters), is passed through by `ray`.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]" >&2
  exit 64
fi
config="$1"
shift
if [[ ! -f "$config" ]]; then
  echo "$0: config $config not found (paths are relative to the working dir that is uploaded)" >&2
  exit 66
fi
here="$(cd "$(dirname "$0")" && pwd)"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Without --no-wait, `ray job submit` streams the job log and exits non-zero when the job fails.
exec ray job submit \
  --working-dir . \
  --runtime-env "$here/runtime_env.yaml" \
  ${RAYDPO_SUBMISSION_ID:+--submission-id "$RAYDPO_SUBMISSION_ID"} \
  -- raydpo "${RAYDPO_COMMAND:-train}" "$config" "$@"
