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
# The gateway's configuration is read (and checked) by the app's own loader: nginx's body
# limit is the gateway's, and a broken file stops here rather than in a gunicorn worker.
max_body=$("$BIN/python" -c 'from app.config import load_settings; print(load_settings().max_body_bytes)') \
  || { say "the gateway's configuration cannot be used (see above)"; exit 1; }

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
sed -e "s|@NOFILE@|$nofile|g" -e "s|@CONNECTIONS@|$connections|g" -e "s|@LISTEN@|$public_bind|g" -e "s|@UPSTREAM@|$upstream|g" -e "s|@RUN_DIR@|$run_dir|g" \
  -e "s|@MAX_BODY@|$max_body|g" -e "s|@USER@|$user_line|g" deploy/nginx.conf >"$run_dir/nginx.conf"
# nginx may only raise its soft limit as root; otherwise this shell's soft limit is what it has.
ulimit -Sn "$nofile" 2>/dev/null || true
nginx_args=(-p "$run_dir" -e "$run_dir/error.log" -c "$run_dir/nginx.conf")
"$nginx" -t -q "${nginx_args[@]}"

# ---------------------------------------------------------------- the two processes
gunicorn_pid="" nginx_pid="" stopping=""
stop_both() {
  stopping=1
  # nginx QUIT: stop accepting, finish what it is proxying; gunicorn TERM: the same.
  if [ -n "$nginx_pid" ]; then kill -QUIT "$nginx_pid" 2>/dev/null || true; fi
  if [ -n "$gunicorn_pid" ]; then kill -TERM "$gunicorn_pid" 2>/dev/null || true; fi
}
trap stop_both TERM INT

"$BIN/gunicorn" -c gunicorn.conf.py wsgi:app &
gunicorn_pid=$!

# nginx starts once gunicorn listens, so that the first requests are not 502s.
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
fi

# Whichever exits first ends the service: wait returns early when a signal arrives too.
status=0
if [ -n "$nginx_pid" ]; then
  wait -n "$gunicorn_pid" "$nginx_pid" || status=$?
else
  wait "$gunicorn_pid" || status=$?
fi
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
trap - TERM INT
exit "$status"
