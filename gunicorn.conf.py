"""gunicorn settings for bailian-gateway; each one can be overridden from the environment.

The gateway spends its time waiting on DashScope, so each worker runs many threads (gthread):
one worker per CPU the server may use, each pinned to its own CPU, with 256 threads, so a
2-core machine holds 2 x 256 = 512 slow upstream calls in flight. Pinned, because a worker's
threads take turns on one GIL: every time one lets go of it for a system call (a socket, SQLite)
another takes it, and when those threads run on different CPUs each hand-off wakes a thread
on the other CPU and moves the interpreter's working set between the two caches. On one CPU
the same hand-offs stay warm. Measured on the 2-core machine, in six alternating rounds: 2
pinned workers answered 14-33% more running-task queries a second than 4 free ones (0.74-0.97
against 0.90-1.20 ms of CPU each), and their p99 with a 200 ms DashScope at 200 connections was
222-255 ms against 244-416; 2 free workers did no better than 4 (README, "Performance").
256 threads: the workers do not share connections evenly (whichever is idle accepts first), so
each needs more than its even share. An idle thread costs nothing but memory: the worker class
(gunicorn_workers.py) gives each request to the thread idle the shortest, so a steady load stays
on a few threads after a burst, and the thread that answered a request serves the connection's
next one when it follows at once.
Command-line flags (`-b HOST:PORT`, `-w N`) still win over everything here, as in any gunicorn
setup.
"""

import collections
import gc
import json
import logging
import os
import queue
import shutil
import tempfile
import time
from logging.handlers import QueueHandler, QueueListener

from gunicorn import glogging


def _env(name, default):
    return os.environ.get(name, default)


def _usable_cpus():
    # The CPUs this process may run on (a container's cpuset, taskset), not all the machine has.
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


_cpus = _usable_cpus()

bind = _env("GATEWAY_BIND", "127.0.0.1:8000")
workers = int(_env("GATEWAY_WORKERS", str(len(_cpus))))
# gthread, on a thread pool that keeps a steady load on the same few threads (gunicorn_workers.py).
worker_class = _env("GATEWAY_WORKER_CLASS", "gunicorn_workers.LifoThreadWorker")
threads = int(_env("GATEWAY_THREADS", "256"))
# Each worker runs on one CPU (pre_fork below); off where the OS cannot pin processes.
_pin_workers = _env("GATEWAY_PIN_WORKERS", "true").lower() == "true" and hasattr(
    os, "sched_setaffinity"
)
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
# For the same reason nothing below imports the app: the master must not hold its modules.
preload_app = _env("GATEWAY_PRELOAD", "false").lower() == "true"

# gunicorn opens a control socket at one path per user by default, so a second master on the
# machine (another instance, a test run) takes it over and `gunicornc` steers the wrong one, or
# the first master to stop deletes the other's. Off unless this instance is given its own path.
_control_socket = _env("GATEWAY_CONTROL_SOCKET", "")
control_socket_disable = not _control_socket
if _control_socket:
    control_socket = _control_socket


# ------------------------------------------------------------------ logs: one JSON object a line

# The same fields as app/observability/logs.py's formatter (used when not under gunicorn).
_JSON_FORMATTER = {
    "()": "pythonjsonlogger.orjson.OrjsonFormatter",
    "fmt": "%(levelname)s %(name)s %(message)s",
    "rename_fields": {"levelname": "level", "name": "logger"},
    "timestamp": "time",
}


class _AccessFields(logging.Filter):
    """Turn gunicorn's access-log atoms into a few named fields: never a header or a query."""

    def filter(self, record):
        atoms = record.args
        if isinstance(atoms, dict):
            # The atoms hold every request header (Authorization included): pick, never dump.
            record.remote_addr = atoms.get("h")
            record.method = atoms.get("m")
            record.path = atoms.get("U")
            record.status = int(atoms["s"]) if str(atoms.get("s", "")).isdigit() else None
            record.bytes = atoms.get("B")
            record.duration_ms = round(atoms.get("D", 0) / 1000, 1)
            # The answer's X-Request-Id: DashScope's id when the answer came from upstream.
            record.x_request_id = atoms.get("{x-request-id}o")
            record.user_agent = atoms.get("a")
            record.msg, record.args = "%s %s %s", (record.method, record.path, record.status)
        return True


def _handler(target, stream):
    if target is None:
        return {"class": "logging.NullHandler"}
    if target == "-":
        return {"class": "logging.StreamHandler", "stream": f"ext://sys.{stream}"}
    # A FileHandler, so USR1 (log rotation) reopens it.
    return {"class": "logging.FileHandler", "filename": target}


def _logconfig(level, error_target, access_target):
    error_handler = {**_handler(error_target, "stderr"), "formatter": "json"}
    access_handler = {**_handler(access_target, "stdout"), "formatter": "json"}
    access_handler["filters"] = ["access_fields"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": _JSON_FORMATTER},
        "filters": {"access_fields": {"()": _AccessFields}},
        "handlers": {"error": error_handler, "access": access_handler},
        # The app's loggers propagate to the root: its lines share gunicorn's error log.
        "root": {"level": level, "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["error"], "propagate": False},
            # gunicorn logs access lines at INFO: WARNING skips building a record nobody writes.
            "gunicorn.access": {
                "level": "INFO" if access_target else "WARNING",
                "handlers": ["access"],
                "propagate": False,
            },
            # One line per request and per upstream call, whatever GATEWAY_LOG_LEVEL says.
            "bailian_gateway": {"level": "INFO", "propagate": True},
        },
    }


# GATEWAY_LOG_CONFIG names a JSON logging dictConfig that replaces this one (to reroute a logger).
# This file cannot see gunicorn's command line, so its log flags cannot reach the dict: the
# GATEWAY_* variables set the log level and destinations.
_log_config_path = _env("GATEWAY_LOG_CONFIG", "")
if _log_config_path:
    with open(_log_config_path) as _file:
        logconfig_dict = json.load(_file)
else:
    logconfig_dict = _logconfig(loglevel.upper(), errorlog, accesslog)


class _GatewayLogger(glogging.Logger):
    """gunicorn's logger, minus building access lines that go nowhere."""

    def access(self, resp, req, environ, request_time):
        # With any logconfig gunicorn computes every request's atoms (headers and all) before
        # the level check; with access lines off that is CPU spent for nothing.
        if accesslog or _log_config_path:
            super().access(resp, req, environ, request_time)


logger_class = _GatewayLogger

_log_listener = None
# How often the listener thread looks for queued log lines.
LOG_DRAIN_SECONDS = 0.05


class _PolledQueue:
    """A record queue whose reader polls: enqueueing never wakes another thread."""

    def __init__(self, interval):
        self._items = collections.deque()
        self._interval = interval

    def put_nowait(self, item):
        """Queue an item (deque.append is atomic: no lock is taken)."""
        self._items.append(item)

    def get(self, block=True):
        """Return the oldest item, sleeping between looks while there is none."""
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                if not block:
                    raise queue.Empty from None
                time.sleep(self._interval)


class _RecordQueueHandler(QueueHandler):
    """Queue the record itself: the listener thread formats it."""

    def prepare(self, record):
        # The stock handler formats and copies each record in the request thread, so that it
        # can cross to another process; this queue stays in the worker, and the arguments the
        # gateway logs are plain values that nothing changes after the call.
        return record


def post_fork(server, worker):
    """Pin the worker to its CPU; keep its log lines cheap and off its request threads."""
    global _log_listener
    _pin_to_cpu(worker)
    if not _log_config_path:
        # No built-in line says where it was logged from (file, line, function), or which thread
        # and process logged it. Finding out walks the caller's frames for every record (12% of
        # the instructions a line costs) and asks for the thread and the process (a system
        # call). These are the switches Python's logging HOWTO ("Optimization") names for them.
        # An operator's own configuration may print those fields, so it keeps them.
        logging._srcfile = None
        logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # Request threads only enqueue their records: JSON encoding and the write (and the
    # handler lock that serialises them) would otherwise sit inside every request, and a
    # slow log reader would stall requests. The listener drains the queue every
    # LOG_DRAIN_SECONDS instead of being woken per record: a wake-up per line cost more CPU
    # than the line itself, and took the GIL from request threads.
    root = logging.getLogger()
    if root.handlers and _log_listener is None:
        records = _PolledQueue(LOG_DRAIN_SECONDS)
        _log_listener = QueueListener(records, *root.handlers, respect_handler_level=True)
        root.handlers = [_RecordQueueHandler(records)]
        _log_listener.start()


def worker_exit(server, worker):
    """Write out the log lines still queued before the worker goes."""
    if _log_listener is not None:
        _log_listener.stop()


# ------------------------------------------------------------ CPUs: each worker on a CPU of its own


def pre_fork(server, worker):
    """Choose the new worker's CPU: of the usable ones, the one fewest live workers run on."""
    if not _pin_workers:
        return
    # Counted from the live workers, so a replacement (a crash, max_requests, a HUP reload's new
    # generation) goes where a worker is missing, and the CPUs stay evenly shared.
    taken = collections.Counter(
        getattr(other, "gateway_cpu", None) for other in server.WORKERS.values()
    )
    worker.gateway_cpu = min(_cpus, key=lambda cpu: (taken[cpu], cpu))


def _pin_to_cpu(worker):
    cpu = getattr(worker, "gateway_cpu", None)
    if cpu is None:
        return
    try:
        # Before the worker starts its threads: they inherit the calling thread's CPUs.
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # the CPU went away since the master started, say
        worker.log.warning("worker stays on every CPU: cannot pin it to CPU %s (%s)", cpu, exc)
        return
    worker.log.info("worker pinned to CPU %s", cpu)


# ------------------------------------------- memory: what the app was loaded with, out of GC passes


def post_worker_init(worker):
    """Exempt the objects the worker loaded the app with from the garbage collector's passes."""
    # A worker holds some 65,000 objects once the app is loaded, for as long as it lives. A full
    # collection walks all of them with the GIL held: under load one came every 30 to 60 s in
    # each worker and stopped every request in it for 30-45 ms of CPU (45-100 ms of wall time
    # on two busy cores), a tail-latency spike. Frozen, they are never walked again, and a
    # full collection walks only what the worker made since (about 5 ms). Objects that die
    # later are still freed as usual; only a cycle among them would stay.
    gc.collect()
    gc.freeze()


# ------------------------------------------------------- metrics: shared by every worker process


def on_starting(server):
    """Give the workers an empty directory to keep their Prometheus metrics in."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="bailian-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        server.gateway_metrics_tmpdir = directory
        server.log.info("metrics of the workers are kept in %s", directory)
        if server.cfg.preload_app:
            # The app, and with it prometheus_client, was imported before this hook ran.
            server.log.warning(
                "GATEWAY_PRELOAD=true: set PROMETHEUS_MULTIPROC_DIR in the environment, "
                "or /metrics shows only the worker that answers"
            )
        return
    os.makedirs(directory, exist_ok=True)
    # Files of an earlier run would be summed with this one's.
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the shared metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory this master made."""
    directory = getattr(server, "gateway_metrics_tmpdir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
