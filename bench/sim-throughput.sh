#!/usr/bin/env bash
# teams-sim throughput on one core: the simulator pinned to CPU 0 with a
# current-thread runtime, wrk pinned to CPU 1, throttling off, latency 0.
#   bash bench/sim-throughput.sh [seconds]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-10}"
SIM="$ROOT/target/release/teams-sim"
[ -x "$SIM" ] || cargo build --release -p teams-sim --bin teams-sim
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 "$SIM" --listen "127.0.0.1:$PORT" --world "$ROOT/deploy/demo/world.json" --no-throttle --threads 1 --max-records 100000 >/dev/null &
SIM_PID=$!
trap 'kill $SIM_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/_admin/health" >/dev/null && break; sleep 0.1; done
export TOKEN=$(curl -sf -XPOST "http://127.0.0.1:$PORT/botframework.com/oauth2/v2.0/token" \
  -d grant_type=client_credentials -d client_id=acme-bot-app -d client_secret=acme-demo-secret \
  --data-urlencode scope=https://api.botframework.com/.default | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
URL="http://127.0.0.1:$PORT/teams/v3/conversations/19%3Aacme-alerts%40thread.tacv2/activities"
echo "taskset -c 1 wrk -t1 -c64 -d${SECS}s -s bench/wrk-send.lua $URL"
taskset -c 1 wrk -t1 -c64 -d"${SECS}s" -s "$ROOT/bench/wrk-send.lua" "$URL"
curl -s "http://127.0.0.1:$PORT/_admin/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("sim accepted", s["activities_total"], "activities; statuses", s["responses_by_status"])'
