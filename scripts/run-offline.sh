#!/usr/bin/env bash
# Run the gateway on embedded defaults (SQLite in ./instance) against the bundled DashScope
# simulator, offline. Prints a working key and a curl line; Ctrl-C stops both processes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT=${PORT:-8000}
SIM_PORT=${SIM_PORT:-8001}
INSTANCE=${GATEWAY_INSTANCE_PATH:-instance}
mkdir -p "$INSTANCE"

export SIMULATOR_API_KEY=sk-simulator-offline
if [ -z "${GATEWAY_CONFIG:-}" ]; then
  # The shipped example names the simulator's default port; point it at the one asked for.
  GATEWAY_CONFIG="$INSTANCE/simulator.toml"
  sed "s#http://127.0.0.1:8001#http://127.0.0.1:$SIM_PORT#" config/simulator.toml >"$GATEWAY_CONFIG"
fi
export GATEWAY_CONFIG

"$BIN/python" -m simulator --port "$SIM_PORT" --keys "$SIMULATOR_API_KEY" >/dev/null &
sim_pid=$!
trap 'kill $sim_pid 2>/dev/null || true' EXIT

# One demo key for every run: the secret is kept (owner-only) beside the database, and reused
# while `keys list` still shows it active for account "demo".
key_file="$INSTANCE/demo-key"
key=""
if [ -s "$key_file" ]; then
  key=$(cat "$key_file")
  hint="sk-...${key: -4}"
  "$BIN/bailian-gateway" keys list | awk -v h="$hint" '$2 == "demo" && $3 == h && $4 == "active" {found=1} END {exit !found}' \
    || key=""
fi
if [ -z "$key" ]; then
  key=$("$BIN/bailian-gateway" keys create demo | tail -n 1)
  (umask 077 && printf '%s\n' "$key" >"$key_file")
fi
base="http://127.0.0.1:$PORT/alibailian/api/v1"
cat <<MSG

bailian-gateway on http://127.0.0.1:$PORT, DashScope simulated on 127.0.0.1:$SIM_PORT.
Your key (account "demo", kept in $key_file): $key

Submit a task:
  curl -s $base/services/aigc/video-generation/video-synthesis \\
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \\
    -d '{"model": "wan2.5-t2v-preview", "input": {"prompt": "a cat surfing"}}'
Then query it:
  curl -s $base/tasks/<task_id> -H "Authorization: Bearer $key"

MSG
"$BIN/gunicorn" -c gunicorn.conf.py -b "127.0.0.1:$PORT" wsgi:app
