"""Open the database: SQLite in the instance folder by default, PostgreSQL by URL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, ExceptionContext, Select, create_engine, event

from app.store.group_commit import GroupCommit, refuses_writes
from app.store.schema import upgrade_schema

T = TypeVar("T")

# How long a connection waits for a lock other connections hold.
SQLITE_BUSY_TIMEOUT_MS = 10_000
# The same wait on PostgreSQL (`lock_timeout`): a statement that waited this long for a lock
# (another session's LOCK TABLE, a long transaction, a migration) fails with LockNotAvailable, an
# OperationalError, instead of waiting for ever, so that a submit that cannot be written ahead
# gets its 503 before anything is sent, and an accepted task's record retries, then journals.
POSTGRESQL_LOCK_TIMEOUT_MS = SQLITE_BUSY_TIMEOUT_MS


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


def _bound_lock_waits(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
    # In the startup packet, so it costs no statement; before the URL's own `options`, so that
    # a `-c lock_timeout=...` there (or a `-c search_path=...`) still has its say.
    options = params.get("options")
    bound = f"-c lock_timeout={POSTGRESQL_LOCK_TIMEOUT_MS}"
    params["options"] = f"{bound} {options}" if options else bound


def _read_only_is_a_lost_connection(context: ExceptionContext) -> None:
    # A session that found the server read-only (a standby after a failover, or
    # `default_transaction_read_only`) stays so until it reconnects: its pool's connections
    # are dropped, as for a lost one, so that a retry opens a new session.
    if refuses_writes(context.original_exception):
        context.is_disconnect = True


# SQLite lets one writer in at a time and makes the others sleep and retry (up to 100 ms a
# nap); queueing a process's writers on a lock instead wakes each the moment it may go.
_group_commits: WeakKeyDictionary[Engine, GroupCommit] = WeakKeyDictionary()


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """Open a write transaction; on SQLite, one at a time per process."""
    group = _group_commits.get(engine)
    if group is None:
        with engine.begin() as conn:
            yield conn
        return
    with group.lock, engine.begin() as conn:
        yield conn


def group_commit_of(engine: Engine) -> GroupCommit | None:
    """Return the group commit of a SQLite engine's writes (None for other databases)."""
    return _group_commits.get(engine)


def write(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Return `work(conn)` run in a write transaction; on SQLite, committed with others queued.

    For the writes every submit makes: under load a batch shares one commit (group_commit.py).
    """
    group = _group_commits.get(engine)
    if group is None:
        with engine.begin() as conn:
            return work(conn)
    return group.run(work)


class DirectRead:
    """A one-row SELECT that SQLAlchemy compiles once per engine and a pooled cursor runs."""

    # For a lookup by primary key, a Connection's execution context and Result cost as much as
    # everything else together: the ownership read measured 288k instructions through a
    # Connection and 141k through this, on SQLite. This keeps what SQLAlchemy does for such a
    # read (the dialect's SQL, the type conversions, the pool with its pre-ping and its reset)
    # and drops the per-call machinery around them.

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: WeakKeyDictionary[Engine, _CompiledRead] = WeakKeyDictionary()

    def first(self, engine: Engine, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Return the first row, converted as a Result would convert it, or None."""
        compiled = self._compiled.get(engine)
        if compiled is None:
            compiled = self._compiled[engine] = _CompiledRead.of(self.statement, engine)
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(compiled.sql, compiled.parameters(params))
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            # Back to the pool, which rolls back whatever the driver began.
            connection.close()
        return None if row is None else compiled.convert(row)


Processor = Callable[[Any], Any]


@dataclass(frozen=True)
class _CompiledRead:
    """A statement's SQL for one dialect, with how its values cross to and from the driver."""

    sql: str
    # Bind names in the order the SQL takes them; None when the driver takes them by name.
    order: tuple[str, ...] | None
    bind_processors: dict[str, Processor]
    # (column position, processor) for each column whose values the driver cannot return as is.
    result_processors: tuple[tuple[int, Processor], ...]

    @classmethod
    def of(cls, statement: Select[Any], engine: Engine) -> _CompiledRead:
        """Compile the statement for the engine's dialect."""
        dialect = engine.dialect
        compiled = statement.compile(dialect=dialect)
        bind_processors: dict[str, Processor] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                bind_processors[name] = processor
        result_processors: list[tuple[int, Processor]] = []
        for position, column in enumerate(statement.selected_columns):
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                result_processors.append((position, processor))
        return cls(
            sql=compiled.string,
            order=tuple(compiled.positiontup or ()) if compiled.positional else None,
            bind_processors=bind_processors,
            result_processors=tuple(result_processors),
        )

    def parameters(self, params: Mapping[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        """Return the parameters as the driver takes them."""
        converted = {
            name: processor(value) if (processor := self.bind_processors.get(name)) else value
            for name, value in params.items()
        }
        return converted if self.order is None else tuple(converted[name] for name in self.order)

    def convert(self, row: Any) -> tuple[Any, ...]:
        """Return a driver's row with each value converted to its column's Python type."""
        values = list(row)
        for position, processor in self.result_processors:
            values[position] = processor(values[position])
        return tuple(values)


def open_engine(
    url: str, pool_size: int = 10, max_overflow: int = 10, *, upgrade: bool = True
) -> Engine:
    """Create the engine for a database URL and, unless told not to, migrate it to head."""
    # Each gunicorn worker has its own pool; a thread holds a connection only for one short
    # query, so a pool far smaller than the thread count serves them all.
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # A server can restart under a pool; a local file cannot go stale that way.
        pool_pre_ping=not is_sqlite,
        # Error messages (and so log lines) name the statement, never the values bound to it:
        # those are keys' hashes and DashScope's answers.
        hide_parameters=True,
    )
    if is_sqlite:
        event.listen(engine, "connect", _tune_sqlite)
        _group_commits[engine] = GroupCommit(engine)
    postgresql = engine.dialect.name == "postgresql"
    if postgresql:
        event.listen(engine, "handle_error", _read_only_is_a_lost_connection)
    if upgrade:
        try:
            upgrade_schema(engine)
        except BaseException:
            engine.dispose()
            raise
    if postgresql:
        # Bounded after the migration only: a worker starting while another one migrates waits
        # for it on the schema lock however long that takes. The migration's connection goes,
        # so that every connection serving requests waits at most the lock timeout.
        if upgrade:
            engine.dispose()
        event.listen(engine, "do_connect", _bound_lock_waits)
    return engine
