#!/usr/bin/env bash
# Run the gateway on embedded defaults (SQLite in ./instance) against the bundled DashScope
# simulator, offline. Prints a working key and a curl line; Ctrl-C stops both processes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-8000}
SIM_PORT=${SIM_PORT:-8001}

export SIMULATOR_API_KEY=sk-simulator-offline
export GATEWAY_CONFIG=${GATEWAY_CONFIG:-config/simulator.toml}

"$BIN/python" -m simulator --port "$SIM_PORT" --keys "$SIMULATOR_API_KEY" >/dev/null &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null || true' EXIT

key=$("$BIN/bailian-gateway" keys create demo | tail -n 1)
base="http://127.0.0.1:$PORT/alibailian/api/v1"
cat <<MSG

bailian-gateway on http://127.0.0.1:$PORT, DashScope simulated on 127.0.0.1:$SIM_PORT.
Your key (account "demo"): $key

Submit a task:
  curl -s $base/services/aigc/video-generation/video-synthesis \\
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"model": "wan2.5-t2v-preview", "input": {"prompt": "a cat surfing"}}'
Then query it:
  curl -s $base/tasks/<task_id> -H "Authorization: Bearer $key"

MSG
"$BIN/gunicorn" -c gunicorn.conf.py -b "127.0.0.1:$PORT" wsgi:app
