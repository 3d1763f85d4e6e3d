"""gunicorn settings for bailian-gateway: each reads a GATEWAY_* variable, with a line on why.

The defaults suit an I/O-bound proxy on the machine it runs on. What the hooks do (JSON logs,
CPU pinning, the workers' metrics directory) is in gunicorn_hooks.py, which imports nothing of
the app, so a HUP reload loads the app fresh. Command-line flags (`-b HOST:PORT`, `-w N`) still
win over everything here, as in any gunicorn setup. Names starting with `_` are not gunicorn
settings. docs/operations.md has the measurements behind the defaults.
"""

import os

import gunicorn_hooks

_env = os.environ.get
_cpus = gunicorn_hooks.usable_cpus()

# ---------------------------------------------------------------------------- serving

# Local: in production clients reach nginx (deploy/nginx.conf), which forwards here.
bind = _env("GATEWAY_BIND", "127.0.0.1:8000")
# One worker per CPU the server may use; the threads below do the waiting on DashScope.
workers = int(_env("GATEWAY_WORKERS", str(len(_cpus))))
# gthread, on a pool that keeps a steady load on the same few warm threads (gunicorn_workers.py).
worker_class = _env("GATEWAY_WORKER_CLASS", "gunicorn_workers.LifoThreadWorker")
# 2 x 256 slow DashScope calls in flight on 2 cores; workers share connections unevenly.
threads = int(_env("GATEWAY_THREADS", "256"))
# Each worker on a CPU of its own: its threads hand the GIL to each other in one warm cache.
_pin_workers = _env("GATEWAY_PIN_WORKERS", "true").lower() == "true" and hasattr(
    os, "sched_setaffinity"
)
# Idle keep-alive connections a worker holds beyond its busy threads.
worker_connections = int(_env("GATEWAY_WORKER_CONNECTIONS", "1000"))
# Connections the kernel holds while every worker is busy, before it refuses more.
backlog = int(_env("GATEWAY_BACKLOG", "2048"))

# ------------------------------------------------------------------------------- time

# Above the upstream read timeout (30 s), so a slow DashScope answer never gets a worker killed.
timeout = int(_env("GATEWAY_TIMEOUT", "120"))
# Time for in-flight requests to finish on reload (HUP) and stop (TERM).
graceful_timeout = int(_env("GATEWAY_GRACEFUL_TIMEOUT", "60"))
# Idle kept-alive connections close after this; above nginx's upstream keepalive_timeout (4 s).
# Also the time a connection has to send a complete request head (gunicorn_workers.py).
keepalive = int(_env("GATEWAY_KEEPALIVE", "5"))
# Off: a worker lives until a reload (both set, workers are recycled after so many requests).
max_requests = int(_env("GATEWAY_MAX_REQUESTS", "0"))
max_requests_jitter = int(_env("GATEWAY_MAX_REQUESTS_JITTER", "0"))

# ------------------------------------------------------------------------------- logs

# One JSON object a line; access lines (gunicorn's) off unless asked for, errors to stderr.
loglevel = _env("GATEWAY_LOG_LEVEL", "info")
accesslog = _env("GATEWAY_ACCESS_LOG", None)
errorlog = _env("GATEWAY_ERROR_LOG", "-")
# An operator's JSON dictConfig replaces the built-in one (this file cannot see gunicorn's log
# flags, so the GATEWAY_* variables above set the level and destinations).
_log_config_file = _env("GATEWAY_LOG_CONFIG", "")
if _log_config_file:
    logconfig_dict = gunicorn_hooks.read_log_config(_log_config_file)
else:
    logconfig_dict = gunicorn_hooks.log_config(loglevel, errorlog, accesslog)
# gunicorn's logger, minus building access lines nobody writes.
logger_class = gunicorn_hooks.GatewayLogger

# ---------------------------------------------------------------------------- process

# Import the app in each worker, not the master, so a HUP reload loads new code and config.
preload_app = _env("GATEWAY_PRELOAD", "false").lower() == "true"
# Off by default: gunicorn's default path is one per user, so a second master would take it.
_control_socket = _env("GATEWAY_CONTROL_SOCKET", "")
control_socket_disable = not _control_socket
if _control_socket:
    control_socket = _control_socket

# ------------------------------------------------------------------------------ hooks

_hooks = gunicorn_hooks.Hooks(
    cpus=_cpus if _pin_workers else [],
    # An operator's log configuration may print where and by whom a line was logged.
    cheap_log_records=not _log_config_file,
)
on_starting = _hooks.on_starting  # a metrics directory for the workers; reloads checked first
pre_fork = _hooks.pre_fork  # the CPU the new worker will run on
post_fork = _hooks.post_fork  # pin it there; log lines off the request threads
post_worker_init = _hooks.post_worker_init  # what the app was loaded with, out of GC passes
worker_exit = _hooks.worker_exit  # write out queued log lines
child_exit = _hooks.child_exit  # a dead worker's gauges out of the metrics
on_exit = _hooks.on_exit  # remove the metrics directory this master made
