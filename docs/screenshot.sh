#!/usr/bin/env bash
# Reproduce docs/prefect-ui.png and docs/prefect-ui-artifacts.png: start a Prefect server, run a small
# distillation on the embedded SmolLM2 + Wikipedia against it (25 stages, 7 min on 2 busy CPU cores, in its
# own store), and screenshot the flow run page and the metrics artifact with headless Chromium.
# Needs `make install` and chromium (Debian: apt-get install chromium). Run from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-4567}
STORE=${STORE:-/tmp/dmsae-ui-store}  # not ./artifacts: a demo run should not land in your store
WORK=$(mktemp -d)
export PREFECT_HOME="$WORK/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
URL="http://127.0.0.1:$PORT"
export PREFECT_UI_API_URL="$URL/api"  # else the UI (in the browser) looks for the API on port 4200

setsid .venv/bin/prefect server start --host 127.0.0.1 --port "$PORT" >"$WORK/server.log" 2>&1 </dev/null &
SERVER=$!
# the server starts children (uvicorn, services): stop its whole process group
trap 'kill -TERM -- -$SERVER 2>/dev/null; sleep 2; kill -KILL -- -$SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 120); do curl -sf "$URL/api/health" >/dev/null && break; sleep 1; done
curl -sf "$URL/api/health" >/dev/null || { tail -20 "$WORK/server.log"; exit 1; }

PREFECT_API_URL="$URL/api" .venv/bin/dmsae run configs/quickstart.yaml --no-progress \
  --set name=ui-demo --set store="$STORE" --set report_dir="$STORE/reports" --set cycles=2 \
  --set data.train_tokens=16384 --set data.attribution_tokens=512 --set data.eval_tokens=512 \
  --set sae.width=512 --set train.batch_size=256 --set train.epochs=1 --set reuse.k=[32]

# the run's id and its metrics artifact's id, from the API
api() { curl -sf -X POST -H 'content-type: application/json' -d "$2" "$URL/api/$1"; }
RUN=$(api flow_runs/filter '{"sort": "START_TIME_DESC", "limit": 1}' | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
ART=$(api artifacts/filter '{"artifacts": {"key": {"any_": ["dmsae-metrics"]}}, "limit": 1, "sort": "CREATED_DESC"}' \
  | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

shot() {  # shot OUTPUT.png WIDTH,HEIGHT PAGE: a fresh profile each time, no network beyond the local server
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$(mktemp -d -p "$WORK")" \
    --window-size="$2" --virtual-time-budget="${BUDGET:-20000}" --screenshot="$1" "$URL$3" 2>/dev/null
}
shot docs/prefect-ui.png 1600,1000 "/runs/flow-run/$RUN"
shot docs/prefect-ui-artifacts.png 2000,760 "/artifacts/artifact/$ART"  # wide: every metric column
echo "wrote docs/prefect-ui.png (flow run $RUN) and docs/prefect-ui-artifacts.png (artifact $ART)"
