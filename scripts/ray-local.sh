#!/usr/bin/env bash
# btm's test Ray cluster: a real single-node Ray head on 127.0.0.1 with token authentication,
# its Jobs API (the dashboard) on 127.0.0.1:${RAY_DASHBOARD_PORT:-8265}. Ray comes from a cached
# venv (${RAY_VENV:-~/.cache/btm-ci/ray-venv}, `ray[default]==2.60.0`, installed on first use).
#   eval "$(bash scripts/ray-local.sh start)"   # exports BTM_RAY_ADDRESS and RAY_AUTH_TOKEN
#   bash scripts/ray-local.sh stop
# After start:
#   curl -H "Authorization: Bearer $RAY_AUTH_TOKEN" "$BTM_RAY_ADDRESS/api/jobs/"
# answers a JSON list; without the header it is 401, with another token 403.
# Token auth (Ray >= 2.5x): RAY_AUTH_MODE=token and the token in RAY_AUTH_TOKEN in the
# environment of `ray start`; the dashboard then wants `Authorization: Bearer <token>` on every
# API path but a few health checks. Memory is kept small for a 2-core, shared machine: a 100 MB
# object store and 2 CPUs (so at most 2 jobs asking 1 CPU each run at once). A start takes
# about 15 s with the venv in place; the head uses about 1-2 GB of memory.
set -euo pipefail
VENV="${RAY_VENV:-$HOME/.cache/btm-ci/ray-venv}"
PORT="${RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
# Ray's own state (sessions, logs, sockets): a fixed folder, so `stop` and a restart find it.
TEMP="${RAY_TEMP_DIR:-/tmp/btm-ray}"
# The token survives a stop, so a head restarted mid-run accepts the token btm already holds.
TOKEN_FILE="$TEMP/btm-auth-token"
case "${1:-start}" in
stop)
  [ -x "$VENV/bin/ray" ] && "$VENV/bin/ray" stop --force >/dev/null 2>&1 || true
  exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
if ! "$VENV/bin/python" -c "import ray, ray.dashboard" 2>/dev/null; then
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q "ray[default]==2.60.0" >&2
fi
mkdir -p "$TEMP"
[ -s "$TOKEN_FILE" ] || "$VENV/bin/python" -c "import secrets; print(secrets.token_hex(32))" > "$TOKEN_FILE"
chmod 600 "$TOKEN_FILE"
TOKEN=$(cat "$TOKEN_FILE")
URL="http://127.0.0.1:$PORT"
if ! curl -sf -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/api/jobs/"; then
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$TOKEN" RAY_USAGE_STATS_ENABLED=0 "$VENV/bin/ray" start --head \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port="$PORT" --num-cpus=2 --num-gpus=0 --object-store-memory=100000000 \
    --temp-dir="$TEMP" --disable-usage-stats > "$TEMP/start.log" 2>&1 \
    || { cat "$TEMP/start.log" >&2; echo "ray start failed" >&2; exit 1; }
fi
# The Jobs API answers some seconds after `ray start` returns (the dashboard's job module).
for _ in $(seq 1 120); do
  curl -sf -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/api/jobs/" && break; sleep 1
done
curl -sf -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/api/jobs/" \
  || { echo "the Ray Jobs API did not answer on $URL within 2 minutes; see $TEMP/session_latest/logs/" >&2; exit 1; }
echo "export BTM_RAY_ADDRESS='$URL' RAY_AUTH_TOKEN='$TOKEN' BTM_RAY_VENV='$VENV'"
