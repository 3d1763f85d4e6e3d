"""The machinery gunicorn.conf.py's hooks run: JSON logs, CPU pinning, metrics, checked reloads.

gunicorn.conf.py keeps the settings and assigns its hooks from a `Hooks` made here. This module
imports nothing of the app: gunicorn's master imports it, and a HUP reload must not find app
code already loaded. `python -m gunicorn_hooks check-settings FILE` checks a gunicorn settings
file the way gunicorn reads it (the master runs it before a reload).
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import queue
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping, Sequence
from datetime import timedelta
from logging.handlers import QueueHandler, QueueListener
from typing import TYPE_CHECKING, Any

from gunicorn import glogging

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config
    from gunicorn.http.message import Request
    from gunicorn.http.wsgi import Response
    from gunicorn.workers.base import Worker


def usable_cpus() -> list[int]:
    """Return the CPUs this process may run on (a cpuset, taskset), not all the machine has."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


# ------------------------------------------------------------------ logs: one JSON object a line

# The same fields as app/observability/logs.py's formatter (used when not under gunicorn).
JSON_FORMATTER = {
    "()": "pythonjsonlogger.orjson.OrjsonFormatter",
    "fmt": "%(levelname)s %(name)s %(message)s",
    "rename_fields": {"levelname": "level", "name": "logger"},
    "timestamp": "time",
}


class AccessFields(logging.Filter):
    """Turn gunicorn's access-log atoms into a few named fields: never a header or a query."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace the atoms with the fields an access line shows."""
        atoms = record.args
        if isinstance(atoms, dict):
            # The atoms hold every request header (Authorization included): pick, never dump.
            fields = {
                "remote_addr": atoms.get("h"),
                "method": atoms.get("m"),
                "path": atoms.get("U"),
                "status": int(atoms["s"]) if str(atoms.get("s", "")).isdigit() else None,
                "bytes": atoms.get("B"),
                "duration_ms": round(atoms.get("D", 0) / 1000, 1),
                # The answer's X-Request-Id: DashScope's id when the answer came from upstream.
                "x_request_id": atoms.get("{x-request-id}o"),
                "user_agent": atoms.get("a"),
            }
            record.__dict__.update(fields)
            record.msg = "%s %s %s"
            record.args = (fields["method"], fields["path"], fields["status"])
        return True


def _handler(target: str | None, stream: str) -> dict[str, Any]:
    if target is None:
        return {"class": "logging.NullHandler"}
    if target == "-":
        return {"class": "logging.StreamHandler", "stream": f"ext://sys.{stream}"}
    # A FileHandler, so USR1 (log rotation) reopens it.
    return {"class": "logging.FileHandler", "filename": target}


def log_config(level: str, error_target: str | None, access_target: str | None) -> dict[str, Any]:
    """Return the logging dictConfig: JSON lines, the app's and gunicorn's in the error log."""
    error_handler = {**_handler(error_target, "stderr"), "formatter": "json"}
    access_handler = {**_handler(access_target, "stdout"), "formatter": "json"}
    access_handler["filters"] = ["access_fields"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": JSON_FORMATTER},
        "filters": {"access_fields": {"()": AccessFields}},
        "handlers": {"error": error_handler, "access": access_handler},
        # The app's loggers propagate to the root: its lines share gunicorn's error log.
        "root": {"level": level.upper(), "handlers": ["error"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["error"], "propagate": False},
            # gunicorn logs access lines at INFO: WARNING skips building a record nobody writes.
            "gunicorn.access": {
                "level": "INFO" if access_target else "WARNING",
                "handlers": ["access"],
                "propagate": False,
            },
            # One line per request and per failed upstream call, whatever GATEWAY_LOG_LEVEL
            # says; at debug, one per answered upstream call too.
            "bailian_gateway": {
                "level": "DEBUG" if level.upper() == "DEBUG" else "INFO",
                "propagate": True,
            },
        },
    }


def read_log_config(path: str) -> dict[str, Any]:
    """Return the operator's logging dictConfig from a JSON file."""
    with open(path) as file:
        config: dict[str, Any] = json.load(file)
    return config


class GatewayLogger(glogging.Logger):
    """gunicorn's logger, minus building access lines that go nowhere."""

    def access(
        self,
        resp: Response,
        req: Request,
        environ: MutableMapping[str, Any],
        request_time: timedelta,
    ) -> None:
        """Log the access line, unless no handler would take it."""
        # With any logconfig gunicorn computes every request's atoms (headers and all) before
        # the level check; with access lines off (the built-in configuration sets the logger
        # to WARNING then) that is CPU spent for nothing.
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)


# How often the listener thread looks for queued log lines.
LOG_DRAIN_SECONDS = 0.05


class _PolledQueue:
    """A record queue whose reader polls: enqueueing never wakes another thread."""

    def __init__(self, interval: float) -> None:
        self._items: collections.deque[logging.LogRecord] = collections.deque()
        self._interval = interval

    def put_nowait(self, item: logging.LogRecord) -> None:
        """Queue an item (deque.append is atomic: no lock is taken)."""
        self._items.append(item)

    def get(self, block: bool = True) -> logging.LogRecord:
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

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Return the record unchanged."""
        # The stock handler formats and copies each record in the request thread, so that it
        # can cross to another process; this queue stays in the worker, and the arguments the
        # gateway logs are plain values that nothing changes after the call.
        return record


# --------------------------------------------------------------------- reloads: checked first

# What the master runs before a HUP reload: the gunicorn settings file, then the app's
# configuration with the app's own loader. Each in a process of its own, so the master never
# imports app code (the new workers must load it fresh) nor keeps a broken settings module.
SETTINGS_CHECK = (sys.executable, "-m", "gunicorn_hooks", "check-settings")
APP_CONFIG_CHECK = (sys.executable, "-m", "app.cli", "config", "check")
CHECK_SECONDS = 60


def check_settings_file(path: str) -> None:
    """Run a gunicorn settings file and give each setting to gunicorn's own validation."""
    from gunicorn.config import Config

    config = Config()
    for name, value in runpy.run_path(path).items():
        if name in config.settings:
            config.set(name, value)


def _run_check(command: Sequence[str], cwd: str) -> str | None:
    """Run one check; return None when it passed, else what it printed."""
    try:
        done = subprocess.run(  # noqa: S603 (this interpreter, fixed arguments)
            list(command),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=CHECK_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(command[1:])} could not run: {exc}"
    if done.returncode == 0:
        return None
    printed = (done.stderr.strip() or done.stdout.strip()).splitlines()
    # The last line is the mistake itself (an uncaught exception prints its traceback above).
    return printed[-1] if printed else f"{' '.join(command[1:])} exited {done.returncode}"


def reload_problem(cfg: Config) -> str | None:
    """Return what is wrong with the files a reload would read, or None when they are fine."""
    cwd = cfg.chdir or os.getcwd()
    settings_file = cfg.config
    if settings_file and not settings_file.startswith("python:"):
        problem = _run_check([*SETTINGS_CHECK, settings_file.removeprefix("file:")], cwd)
        if problem:
            return f"{settings_file}: {problem}"
    return _run_check(APP_CONFIG_CHECK, cwd)


def install_checked_reload(server: Arbiter) -> None:
    """Make the master check the configuration before a HUP reload, and refuse a bad one."""
    reload = server.reload

    def checked_reload() -> None:
        # gunicorn's reload starts new workers, then stops the old ones whether the new ones
        # boot or not; a worker that cannot boot then stops the master ("Worker failed to
        # boot"). Refusing the reload up front keeps the running workers serving.
        log = server.log
        problem = reload_problem(server.cfg)
        if problem is not None:
            if log is not None:
                log.error(
                    "reload refused, the running workers keep serving: %s "
                    "(fix it and send HUP again)",
                    problem,
                )
            return
        reload()

    # An instance attribute: the arbiter's HUP handler calls self.reload().
    server.reload = checked_reload  # type: ignore[method-assign]


# ------------------------------------------------------------------------------- the hooks


class Hooks:
    """The server hooks gunicorn.conf.py assigns, acting on the settings it gives them."""

    def __init__(self, *, cpus: Sequence[int], cheap_log_records: bool) -> None:
        # cpus: the CPUs workers are pinned to, each to the one fewest live workers run on
        # (empty: not pinned). cheap_log_records: skip looking up, for every log record, where
        # and by which thread and process it was logged (no built-in line prints those).
        self.cpus = list(cpus)
        self.cheap_log_records = cheap_log_records
        self._log_listener: QueueListener | None = None

    # ---- the master

    def on_starting(self, server: Arbiter) -> None:
        """Give the workers an empty metrics directory; check reloads before they happen."""
        install_checked_reload(server)
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            directory = tempfile.mkdtemp(prefix="bailian-gateway-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            server.gateway_metrics_tmpdir = directory  # type: ignore[attr-defined]
            if server.log is not None:
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

    def pre_fork(self, server: Arbiter, worker: Worker) -> None:
        """Choose the new worker's CPU: of the usable ones, the one fewest live workers run on."""
        if not self.cpus:
            return
        # Counted from the live workers, so a replacement (a crash, max_requests, a HUP reload's
        # new generation) goes where a worker is missing, and the CPUs stay evenly shared.
        taken = collections.Counter(
            getattr(other, "gateway_cpu", None) for other in server.WORKERS.values()
        )
        worker.gateway_cpu = min(  # type: ignore[attr-defined]
            self.cpus, key=lambda cpu: (taken[cpu], cpu)
        )

    def child_exit(self, server: Arbiter, worker: Worker) -> None:
        """Drop a dead worker's live gauges from the shared metrics."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    def on_exit(self, server: Arbiter) -> None:
        """Remove the metrics directory this master made."""
        directory = getattr(server, "gateway_metrics_tmpdir", None)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)

    # ---- a worker

    def post_fork(self, server: Arbiter, worker: Worker) -> None:
        """Pin the worker to its CPU; keep its log lines cheap and off its request threads."""
        _pin_to_cpu(worker)
        if self.cheap_log_records:
            # Finding out where a line was logged from walks the caller's frames for every
            # record (12% of the instructions a line costs), and which thread and process
            # logged it is a system call. These are the switches Python's logging HOWTO
            # ("Optimization") names for them.
            logging._srcfile = None
            logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
        # Request threads only enqueue their records: JSON encoding and the write (and the
        # handler lock that serialises them) would otherwise sit inside every request, and a
        # slow log reader would stall requests. The listener drains the queue every
        # LOG_DRAIN_SECONDS instead of being woken per record: a wake-up per line cost more CPU
        # than the line itself, and took the GIL from request threads.
        root = logging.getLogger()
        if root.handlers and self._log_listener is None:
            records = _PolledQueue(LOG_DRAIN_SECONDS)
            self._log_listener = QueueListener(records, *root.handlers, respect_handler_level=True)
            root.handlers = [_RecordQueueHandler(records)]
            self._log_listener.start()

    def post_worker_init(self, worker: Worker) -> None:
        """Exempt the objects the worker loaded the app with from the garbage collector's passes."""
        # A worker holds some 65,000 objects once the app is loaded, for as long as it lives. A
        # full collection walks all of them with the GIL held: under load one came every 30 to
        # 60 s in each worker and stopped every request in it for 30-45 ms of CPU (45-100 ms of
        # wall time on two busy cores), a tail-latency spike. Frozen, they are never walked
        # again, and a full collection walks only what the worker made since (about 5 ms).
        # Objects that die later are still freed as usual; only a cycle among them would stay.
        gc.collect()
        gc.freeze()

    def worker_exit(self, server: Arbiter, worker: Worker) -> None:
        """Write out the log lines still queued before the worker goes."""
        if self._log_listener is not None:
            self._log_listener.stop()


def _pin_to_cpu(worker: Worker) -> None:
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


def main(argv: Sequence[str]) -> int:
    """Run `check-settings FILE`: print the mistake and return 1, else return 0."""
    if len(argv) != 2 or argv[0] != "check-settings":
        print("usage: python -m gunicorn_hooks check-settings FILE", file=sys.stderr)
        return 2
    try:
        check_settings_file(argv[1])
    except BaseException as exc:  # a settings file can raise anything, SystemExit included
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
