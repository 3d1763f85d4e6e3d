"""gunicorn settings for bailian-gateway; each one can be overridden from the environment.

The gateway spends its time waiting on DashScope, so each worker runs many threads (gthread):
the default holds 2 x 128 = 256 slow upstream calls in flight on a 2-core machine. Command-line
flags (`-b HOST:PORT`, `-w N`) still win over everything here, as in any gunicorn setup.
"""

import os


def _env(name, default):
    return os.environ.get(name, default)


bind = _env("GATEWAY_BIND", "127.0.0.1:8000")
workers = int(_env("GATEWAY_WORKERS", "2"))
worker_class = _env("GATEWAY_WORKER_CLASS", "gthread")
threads = int(_env("GATEWAY_THREADS", "128"))
# Idle keep-alive connections a gthread worker holds beyond its busy threads.
worker_connections = int(_env("GATEWAY_WORKER_CONNECTIONS", "1000"))
# Above the upstream read timeout (30 s by default), so a slow DashScope answer is never cut
# by gunicorn killing the worker.
timeout = int(_env("GATEWAY_TIMEOUT", "120"))
# Time for in-flight requests to finish on reload (HUP) and stop (TERM).
graceful_timeout = int(_env("GATEWAY_GRACEFUL_TIMEOUT", "60"))
keepalive = int(_env("GATEWAY_KEEPALIVE", "5"))
backlog = int(_env("GATEWAY_BACKLOG", "2048"))
max_requests = int(_env("GATEWAY_MAX_REQUESTS", "0"))
max_requests_jitter = int(_env("GATEWAY_MAX_REQUESTS_JITTER", "0"))
loglevel = _env("GATEWAY_LOG_LEVEL", "info")
accesslog = _env("GATEWAY_ACCESS_LOG", None)
errorlog = _env("GATEWAY_ERROR_LOG", "-")
# Import the app in each worker (not the master) so a HUP reload picks up new code and config.
preload_app = _env("GATEWAY_PRELOAD", "false").lower() == "true"
