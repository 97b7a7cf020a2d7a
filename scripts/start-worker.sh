#!/usr/bin/env bash
# Join a worker machine to the Ray cluster started by scripts/start-head.sh.
#
# Usage:  scripts/start-worker.sh HEAD_HOST:PORT    (blocks; Ctrl-C stops this node)
#
# Needs the head's token first: ~/.ray/auth_token copied from the head, or RAY_AUTH_TOKEN (or
# RAY_AUTH_TOKEN_PATH) set. wsss-tune must be installed here in the same environment as on the
# head, and runtime.runs_root must be mounted at the same path (see README.md, "Run on a cluster").
#
# Environment (defaults in brackets):
#   RAY_NODE_IP   this machine's address as the other nodes reach it   [Ray's guess]
#   RAY_NUM_CPUS  CPUs this node gives to trials                       [all]
#   RAY_NUM_GPUS  GPUs this node gives to trials                       [all]
#   RAY_BIN       the ray executable of wsss-tune's environment        [ray]
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
export RAY_AUTH_MODE=token
RAY_BIN=${RAY_BIN:-ray}

if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s $HOME/.ray/auth_token ]]; then
  echo "start-worker.sh: no cluster token here: copy ~/.ray/auth_token from the head" \
       "(or set RAY_AUTH_TOKEN=\$(ray get-auth-token) as printed there)" >&2
  exit 2
fi

args=(--address "$1" --block --disable-usage-stats)
[[ -n ${RAY_NODE_IP:-} ]] && args+=(--node-ip-address "$RAY_NODE_IP")
[[ -n ${RAY_NUM_CPUS:-} ]] && args+=(--num-cpus "$RAY_NUM_CPUS")
[[ -n ${RAY_NUM_GPUS:-} ]] && args+=(--num-gpus "$RAY_NUM_GPUS")
echo "joining the Ray cluster at $1 (token authentication on)"
exec "$RAY_BIN" start "${args[@]}"
