#!/usr/bin/env bash
# `make serve`: the production deployment on one machine. gunicorn with the shipped
# gunicorn.conf.py on a local address (GATEWAY_BIND, default 127.0.0.1:8000), and nginx with
# deploy/nginx.conf in front of it on the public one (GATEWAY_PUBLIC_BIND, default
# 0.0.0.0:8080). nginx is installed from the system's packages when it is missing (apt-get,
# as root or through sudo, as bench/run.sh does).
#
# Both run in the foreground as children of this script: TERM or INT stops both (gracefully:
# in-flight requests finish), and if either exits on its own the other is stopped and the
# script exits non-zero, so a supervisor (systemd, a container runtime) sees the failure.
# HUP reloads both without dropping a request: gunicorn checks the new configuration first and
# refuses a bad one (gunicorn_hooks.py), and nginx's config is filled in again from
# deploy/nginx.conf and the gateway's configuration, tested, and only then reloaded. This
# script is what a supervisor sees as the main process (systemd's $MAINPID), so its HUP is the
# service's reload.
#
# The gateway's own environment is used as it is (GATEWAY_CONFIG, GATEWAY_DATABASE_URL, the
# channels' key variables, every GATEWAY_* setting of gunicorn.conf.py). Also:
#   GATEWAY_PUBLIC_BIND  nginx's listen address (HOST:PORT, or a port alone)
#   GATEWAY_RUN_DIR      nginx's pid, logs, temp files and filled-in config
#                        (default: instance/run/nginx)
#   GATEWAY_NGINX_USER   the user nginx's workers run as when started as root (www-data)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

export GATEWAY_BIND=${GATEWAY_BIND:-127.0.0.1:8000}
public_bind=${GATEWAY_PUBLIC_BIND:-0.0.0.0:8080}
run_dir=${GATEWAY_RUN_DIR:-instance/run/nginx}
nginx_user=${GATEWAY_NGINX_USER:-www-data}

say() { echo "serve: $*" >&2; }

# A HUP before both processes run (installing nginx, gunicorn still booting: it would die of a
# HUP it has no handler for yet) is kept and applied once they do. Without a trap, HUP would
# kill this script and leave gunicorn and nginx running with no one supervising them.
gunicorn_pid="" nginx_pid="" stopping="" reload_pending="" woken=""
on_hup() {
  woken=1
  if [ -n "$stopping" ]; then return; fi
  if [ -z "$nginx_pid" ]; then
    reload_pending=1
    say "HUP while starting: reloading once gunicorn and nginx run"
    return
  fi
  reload_both
}
trap on_hup HUP

# ---------------------------------------------------------------- nginx, from the system's packages
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }; }
if [ -z "$(find_nginx)" ]; then
  say "installing nginx from the system's packages"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx \
    >/dev/null
fi
nginx=$(find_nginx) || { say "nginx is not installed and could not be installed"; exit 1; }

# ---------------------------------------------------------------- nginx's configuration
case "$public_bind" in *:*) ;; *) public_bind="0.0.0.0:$public_bind" ;; esac
case "$GATEWAY_BIND" in
  unix:*) upstream=$GATEWAY_BIND ;;  # nginx spells a unix socket the same way
  *) upstream=${GATEWAY_BIND/#0.0.0.0:/127.0.0.1:} ;;
esac

mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
for temp in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$run_dir/$temp"; done
user_line=""
if [ "$(id -u)" -eq 0 ]; then
  # nginx's workers must not run as root; they write request bodies to the temp directories.
  user_line="user $nginx_user;"
  for temp in client_body proxy fastcgi uwsgi scgi; do chown "$nginx_user" "$run_dir/$temp"; done
  if ! runuser -u "$nginx_user" -- test -w "$run_dir/client_body"; then
    say "$nginx_user cannot reach $run_dir (a parent directory is closed to it):" \
      "set GATEWAY_RUN_DIR to a directory it can reach, or GATEWAY_NGINX_USER"
    exit 1
  fi
fi
# Descriptors: as many as this process may have (nginx, as root, may raise its own soft limit
# up to the hard one, and no further in a container).
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
connections=$((nofile < 16384 ? nofile : 16384))
# nginx may only raise its soft limit as root; otherwise this shell's soft limit is what it has.
ulimit -Sn "$nofile" 2>/dev/null || true

# Fill deploy/nginx.conf into FILE and have nginx test it. At start and on every HUP, so that a
# reload applies a changed deploy/nginx.conf and a changed max_body_bytes. Explicit returns: it
# also runs from the HUP trap, where set -e would end the script on the first mistake.
fill_nginx_conf() {
  local file=$1 max_body
  # The gateway's configuration is read (and checked) by the app's own loader: nginx's body
  # limit is the gateway's, and a broken file stops here rather than in a gunicorn worker. Its
  # mistake in one line (file, key, what was expected), as `bailian-gateway config check` says it.
  max_body=$("$BIN/python" -c '
import sys
from app.config import ConfigError, load_settings
try:
    print(load_settings().max_body_bytes)
except ConfigError as exc:
    sys.exit(f"serve: {exc}")
') || { say "the gateway's configuration cannot be used (see above)"; return 1; }
  sed -e "s|@NOFILE@|$nofile|g" -e "s|@CONNECTIONS@|$connections|g" -e "s|@LISTEN@|$public_bind|g" -e "s|@UPSTREAM@|$upstream|g" -e "s|@RUN_DIR@|$run_dir|g" \
    -e "s|@MAX_BODY@|$max_body|g" -e "s|@USER@|$user_line|g" deploy/nginx.conf >"$file" || return 1
  "$nginx" -t -q -p "$run_dir" -e "$run_dir/error.log" -c "$file" || return 1
}
nginx_args=(-p "$run_dir" -e "$run_dir/error.log" -c "$run_dir/nginx.conf")
fill_nginx_conf "$run_dir/nginx.conf" || exit 1

# HUP: gunicorn first (its master checks the settings file and the gateway's configuration, and
# refuses a reload with a mistake: the running workers keep serving). Then nginx, on a config
# filled in beside the running one: it replaces it only once nginx has tested it, so a mistake
# leaves nginx serving as it was, and nginx.conf the file it serves on.
reload_both() {
  say "HUP: reloading gunicorn (its master checks the new configuration first) and nginx"
  kill -HUP "$gunicorn_pid" 2>/dev/null || true
  if fill_nginx_conf "$run_dir/nginx.conf.new" \
    && mv -f "$run_dir/nginx.conf.new" "$run_dir/nginx.conf"; then
    # A TERM that arrived meanwhile has begun nginx's graceful stop: no reload into it.
    if [ -z "$stopping" ]; then kill -HUP "$nginx_pid" 2>/dev/null || true; fi
  else
    rm -f "$run_dir/nginx.conf.new"
    say "nginx not reloaded, it keeps its running configuration: fix the mistake and send HUP again"
  fi
}

# ---------------------------------------------------------------- the two processes
stop_both() {
  stopping=1
  # nginx QUIT: stop accepting, finish what it is proxying; gunicorn TERM: the same.
  if [ -n "$nginx_pid" ]; then kill -QUIT "$nginx_pid" 2>/dev/null || true; fi
  if [ -n "$gunicorn_pid" ]; then kill -TERM "$gunicorn_pid" 2>/dev/null || true; fi
}
trap stop_both TERM INT

"$BIN/gunicorn" -c gunicorn.conf.py wsgi:app &
gunicorn_pid=$!

# nginx starts once gunicorn listens, so that the first requests are not 502s (and gunicorn,
# listening, has its signal handlers: a HUP no longer kills it).
if [[ $upstream != unix:* ]]; then
  host=${upstream%:*} port=${upstream##*:}
  for _ in $(seq 1 600); do
    [ -n "$stopping" ] && break
    kill -0 "$gunicorn_pid" 2>/dev/null || break
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && break
    sleep 0.1
  done
fi
if [ -z "$stopping" ] && kill -0 "$gunicorn_pid" 2>/dev/null; then
  "$nginx" "${nginx_args[@]}" &
  nginx_pid=$!
  say "nginx on $public_bind in front of gunicorn on $GATEWAY_BIND (nginx's files: $run_dir)"
  if [ -n "$reload_pending" ]; then
    reload_pending=""
    reload_both
  fi
fi

# Whichever exits first ends the service. wait also returns when a trapped signal arrives: after
# a HUP (the trap set `woken`) both may still run, and the script waits again; a child that
# exited meanwhile is waited for by its pid, for its own status.
status=0
pids=("$gunicorn_pid")
if [ -n "$nginx_pid" ]; then pids+=("$nginx_pid"); fi
while :; do
  woken=""
  status=0
  wait -n "${pids[@]}" || status=$?
  if [ -n "$stopping" ] || [ -z "$woken" ]; then break; fi
  gone=""
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || gone=$pid; done
  if [ -n "$gone" ]; then
    # 127: wait -n had already collected its status (it exited, then the trap ran).
    wait "$gone" 2>/dev/null && status=0 || { code=$?; [ "$code" -eq 127 ] || status=$code; }
    break
  fi
done
if [ -z "$stopping" ]; then
  say "$( kill -0 "$gunicorn_pid" 2>/dev/null && echo nginx || echo gunicorn) exited ($status): stopping"
  stop_both
  if [ "$status" -eq 0 ]; then status=1; fi
else
  status=0
fi
# Wait for both, each for as long as its own graceful stop takes.
for pid in $nginx_pid $gunicorn_pid; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
done
trap - TERM INT HUP
exit "$status"
