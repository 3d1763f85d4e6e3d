"""Open the database: SQLite in the instance folder by default, PostgreSQL by URL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from app.store.tables import metadata

log = logging.getLogger(__name__)


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets gunicorn's workers read while one writes; busy_timeout makes writers queue
    # instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


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


def create_schema(engine: Engine) -> None:
    """Create missing tables; tolerate another process creating them at the same moment."""
    try:
        metadata.create_all(engine)
    except SQLAlchemyError:
        # Several workers or instances may race on first start; the loser finds the tables made.
        log.info("schema creation raced with another process; checking again")
        metadata.create_all(engine)
