"""Open the database: SQLite in the instance folder by default, PostgreSQL by URL."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, create_engine, event, text

from app.store.tables import metadata

# How long a connection waits for a lock other connections hold.
SQLITE_BUSY_TIMEOUT_MS = 10_000


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets gunicorn's workers read while one writes; busy_timeout makes writers queue
    # instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Put the database in WAL mode, waiting out other connections switching it too."""
    # The switch needs the database to itself. When workers open a new database at once, each
    # takes a shared lock first, and SQLite fails all but one of them at once ("database is
    # locked") instead of calling the busy handler, since none could wait its way out. The mode
    # is kept in the file: once one has switched it, the others' next try finds it done.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


# SQLite lets one writer in at a time and makes the others sleep and retry (up to 100 ms a
# nap); queueing a process's writers on a lock instead wakes each the moment it may go.
_sqlite_write_locks: WeakKeyDictionary[Engine, threading.Lock] = WeakKeyDictionary()


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """Open a write transaction; on SQLite, one at a time per process."""
    lock = _sqlite_write_locks.get(engine)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.begin() as conn:
        yield conn


def open_engine(url: str, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    """Create the engine for a database URL and make sure the schema exists."""
    # Each gunicorn worker has its own pool; a thread holds a connection only for one short
    # query, so a pool far smaller than the thread count serves them all.
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # A server can restart under a pool; a local file cannot go stale that way.
        pool_pre_ping=not is_sqlite,
    )
    if is_sqlite:
        event.listen(engine, "connect", _tune_sqlite)
        _sqlite_write_locks[engine] = threading.Lock()
    create_schema(engine)
    return engine


# The key of the PostgreSQL advisory lock that schema creation holds ("bailian" in ASCII).
_SCHEMA_LOCK_KEY = 0x6261696C69616E


def create_schema(engine: Engine) -> None:
    """Create missing tables, one process at a time."""
    # Every gunicorn worker (and every instance) runs this as it starts. Checking for each table
    # and creating it are separate statements, so two workers on an empty database both find a
    # table missing and the second CREATE fails: the worker does not boot, and gunicorn stops
    # the whole server. The check and the creation therefore run under a database-wide lock.
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # The write lock, taken now rather than at the first CREATE; busy_timeout queues
            # the other workers behind it.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        metadata.create_all(conn)
