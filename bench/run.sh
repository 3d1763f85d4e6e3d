#!/usr/bin/env bash
# `make bench`: install what the benchmark needs (nginx and wrk from Debian's packages,
# bench/requirements.txt into .venv), then run bench/run.py with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
# nginx's echo module: the 200 ms fake answers after a delay that costs no CPU.
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || missing+=(libnginx-mod-http-echo)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]} from Debian's packages" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

"$BIN/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt

export PATH="$PATH:/usr/sbin"
exec "$BIN/python" bench/run.py "$@"
