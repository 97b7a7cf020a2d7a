#!/usr/bin/env bash
# Start the head of a Ray cluster for wsss-tune searches, with token authentication.
#
# Usage:  scripts/start-head.sh            (run on the head machine; blocks; Ctrl-C stops it)
#
# Environment (defaults in brackets):
#   RAY_PORT         the head's port, which workers and drivers connect to       [6379]
#   RAY_NODE_IP      this machine's address as the other nodes reach it           [Ray's guess]
#   RAY_NUM_CPUS     CPUs this node gives to trials (0: the head runs no trials) [all]
#   RAY_DASHBOARD    1: start the dashboard too                                   [0]
#   RAY_DASHBOARD_HOST / RAY_DASHBOARD_PORT                          [127.0.0.1 / 8265]
#   RAY_TEMP_DIR     Ray's session folder                                          [/tmp/ray]
#   RAY_BIN          the ray executable of the environment wsss-tune is installed in
#                                                                                  [ray]
#
# The cluster token is made here (`ray get-auth-token --generate`, saved to ~/.ray/auth_token)
# unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH already gives one. Every worker and every driver
# needs the same token and RAY_AUTH_MODE=token (see README.md, "Run on a cluster").
set -euo pipefail

export RAY_AUTH_MODE=token
RAY_BIN=${RAY_BIN:-ray}
PORT=${RAY_PORT:-6379}

if [[ -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
  "$RAY_BIN" get-auth-token --generate >/dev/null   # keeps an existing ~/.ray/auth_token
  chmod 600 "$HOME/.ray/auth_token"                 # Ray leaves it to the umask (022: all read it)
  give="scp ~/.ray/auth_token WORKER:.ray/auth_token   (mode 600; or there: export RAY_AUTH_TOKEN=...)"
elif [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
  give="export RAY_AUTH_TOKEN=...   (the value set here; \`ray get-auth-token\` prints it)"
else
  give="copy $RAY_AUTH_TOKEN_PATH to WORKER:.ray/auth_token (or set RAY_AUTH_TOKEN_PATH there)"
fi

args=(--head --block --port "$PORT" --disable-usage-stats)
[[ -n ${RAY_NODE_IP:-} ]] && args+=(--node-ip-address "$RAY_NODE_IP")
[[ -n ${RAY_NUM_CPUS:-} ]] && args+=(--num-cpus "$RAY_NUM_CPUS")
[[ -n ${RAY_TEMP_DIR:-} ]] && args+=(--temp-dir "$RAY_TEMP_DIR")
if [[ ${RAY_DASHBOARD:-0} == 1 ]]; then
  args+=(--include-dashboard true --dashboard-host "${RAY_DASHBOARD_HOST:-127.0.0.1}"
         --dashboard-port "${RAY_DASHBOARD_PORT:-8265}")
else
  args+=(--include-dashboard false)
fi

host=${RAY_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
host=${host:-$(hostname)}
how="RAY_NODE_IP"
[[ -z ${RAY_NODE_IP:-} ]] && how="a guess: Ray prints the address it uses below"
cat <<INFO
Ray head at ${host}:${PORT} (${how}), token authentication on.
1. Give each worker machine the token:
     ${give}
2. Start each worker:    scripts/start-worker.sh ${host}:${PORT}
3. Search from this machine, or from a node joined as in 2 (Ray's driver must run on a node):
     export RAY_AUTH_MODE=token
     wsss-tune search --config CONFIG --address ${host}:${PORT} --tracking-uri http://MLFLOW_HOST:5000
INFO
exec "$RAY_BIN" start "${args[@]}"
