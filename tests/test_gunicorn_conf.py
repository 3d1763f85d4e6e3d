"""The hooks of the shipped gunicorn.conf.py (made by gunicorn_hooks.py), run in this process."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from gunicorn_hooks import Hooks

CONF_PATH = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"


def load_gunicorn_conf() -> ModuleType:
    """Load gunicorn.conf.py as gunicorn does: a plain module run once."""
    spec = importlib.util.spec_from_file_location("gunicorn_conf", CONF_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gunicorn_conf() -> Iterator[ModuleType]:
    """The shipped gunicorn.conf.py, loaded under this process's environment."""
    yield load_gunicorn_conf()
    gc.unfreeze()


@pytest.fixture
def logging_untouched_after() -> Iterator[None]:
    """Undo what a worker's logging hook does to this process's logging module."""
    root = logging.getLogger()
    handlers, srcfile = root.handlers[:], logging._srcfile  # type: ignore[attr-defined]
    switches = logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    # With no root handler, the hook starts no listener thread in the test process.
    root.handlers = []
    yield
    root.handlers = handlers
    logging._srcfile = srcfile  # type: ignore[attr-defined]
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches


def logged_record() -> logging.LogRecord:
    """Log a line from here and return its record."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("tests.where_logged_from")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("here")
    finally:
        logger.removeHandler(handler)
    return records[0]


def where_logged_from() -> tuple[str, int]:
    """Log a line; return the function and line its record says it came from."""
    record = logged_record()
    return record.funcName, record.lineno


def who_logged() -> tuple[object, object, object, object]:
    """Log a line; return the thread, thread name, process and process name its record names."""
    record = logged_record()
    return record.thread, record.threadName, record.process, record.processName


def tracked_by_collections(thing: object) -> bool:
    """Return whether the garbage collector's passes walk this object."""
    return any(found is thing for found in gc.get_objects())


def test_a_worker_takes_what_it_loaded_out_of_the_collectors_passes(
    gunicorn_conf: ModuleType,
) -> None:
    loaded_with_the_app = {"routes": ["a", "b"]}
    assert tracked_by_collections(loaded_with_the_app)

    gunicorn_conf.post_worker_init(worker=None)

    made_while_serving = {"request": ["c"]}
    assert gc.get_freeze_count() > 0
    assert not tracked_by_collections(loaded_with_the_app)
    assert tracked_by_collections(made_while_serving)


class Node:
    """An object that can be part of a reference cycle and be watched through a weak reference."""

    other: Node


def test_garbage_left_by_loading_the_app_is_collected_not_frozen(
    gunicorn_conf: ModuleType,
) -> None:
    node = Node()
    node.other = node  # only the garbage collector can free a cycle
    watched = weakref.ref(node)
    del node
    gc.disable()  # no collection but the hook's own
    try:
        gunicorn_conf.post_worker_init(worker=None)
    finally:
        gc.enable()
    assert watched() is None


@pytest.mark.usefixtures("logging_untouched_after")
def test_a_worker_does_not_look_up_where_each_line_was_logged_from(
    gunicorn_conf: ModuleType,
) -> None:
    assert where_logged_from()[0] == "logged_record"

    gunicorn_conf.post_fork(server=None, worker=None)

    assert where_logged_from() == ("(unknown function)", 0)


@pytest.mark.usefixtures("logging_untouched_after")
def test_a_worker_does_not_look_up_which_thread_and_process_logged_each_line(
    gunicorn_conf: ModuleType,
) -> None:
    assert who_logged() == (
        threading.get_ident(),
        threading.current_thread().name,
        os.getpid(),
        "MainProcess",
    )

    gunicorn_conf.post_fork(server=None, worker=None)

    assert who_logged() == (None, None, None, None)


@pytest.mark.usefixtures("logging_untouched_after")
def test_an_operators_log_config_keeps_where_each_line_was_logged_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({"version": 1, "disable_existing_loggers": False}))
    monkeypatch.setenv("GATEWAY_LOG_CONFIG", str(config))
    gunicorn_conf = load_gunicorn_conf()

    gunicorn_conf.post_fork(server=None, worker=None)

    assert where_logged_from()[0] == "logged_record"
    assert who_logged()[2] == os.getpid()


class _Worker:
    """What gunicorn's pre_fork and post_fork hooks are given of a worker."""

    def __init__(self) -> None:
        self.log = logging.getLogger("tests.gunicorn_worker")


class _Server:
    """The arbiter as pre_fork sees it: its live workers, by pid."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.WORKERS = dict(enumerate(workers))


def test_each_new_worker_goes_to_the_cpu_fewest_live_workers_run_on() -> None:
    hooks = Hooks(cpus=[0, 1, 2], cheap_log_records=True)
    live: list[_Worker] = []
    for _ in range(5):
        worker = _Worker()
        hooks.pre_fork(_Server(live), worker)  # type: ignore[arg-type]
        live.append(worker)
    spread = [w.gateway_cpu for w in live]  # type: ignore[attr-defined]

    del live[1]  # the worker on CPU 1 died (or a reload replaced it)
    replacement = _Worker()
    hooks.pre_fork(_Server(live), replacement)  # type: ignore[arg-type]

    assert spread == [0, 1, 2, 0, 1]
    assert replacement.gateway_cpu == 1  # type: ignore[attr-defined]


def test_without_pinning_workers_get_no_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PIN_WORKERS", "false")
    gunicorn_conf = load_gunicorn_conf()
    worker = _Worker()
    gunicorn_conf.pre_fork(_Server([]), worker)
    assert not hasattr(worker, "gateway_cpu")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_forked_worker_and_the_threads_it_starts_run_on_its_cpu_only(
    gunicorn_conf: ModuleType, logging_untouched_after: None
) -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)
    worker = _Worker()
    worker.gateway_cpu = cpu  # type: ignore[attr-defined]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # as gunicorn forks a worker, then runs post_fork in it
        try:
            gunicorn_conf.post_fork(server=None, worker=worker)
            seen: dict[str, list[int]] = {}
            thread = threading.Thread(
                target=lambda: seen.setdefault("thread", sorted(os.sched_getaffinity(0)))
            )
            thread.start()
            thread.join()
            seen["worker"] = sorted(os.sched_getaffinity(0))
            os.write(write, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    seen = json.loads(os.read(read, 1000))
    os.close(read)
    os.close(write)

    assert seen == {"worker": [cpu], "thread": [cpu]}
    assert os.sched_getaffinity(0) == before  # the hook ran in the child only


def test_the_settings_and_their_machinery_import_nothing_of_the_app() -> None:
    # The master loads these; a HUP reload can only bring in fresh app code if it never did.
    program = (
        "import sys\nfrom gunicorn.app.base import Application\n"
        "class Loader(Application):\n"
        "    def load_config(self): self.load_config_from_file(sys.argv[1])\n"
        "    def load(self): pass\n"
        "loader = Loader(); import gunicorn_workers\n"
        "assert loader.cfg.worker_class_str == 'gunicorn_workers.LifoThreadWorker'\n"
        "print(sorted(m for m in sys.modules if m == 'app' or m.startswith('app.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(CONF_PATH)],
        cwd=CONF_PATH.parent,
        env={**os.environ, "GATEWAY_WORKER_CLASS": "gunicorn_workers.LifoThreadWorker"},
        capture_output=True,
        text=True,
        check=True,
    )

    assert done.stdout.strip() == "[]"
