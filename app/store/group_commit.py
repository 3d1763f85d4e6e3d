"""Group commit on SQLite: the writes threads queue while one commits go in the next commit.

SQLite takes one writer at a time, and each commit costs about as much as the writes in it
(the WAL frames of every page touched, the lock taken and handed on). Under load a process's
submits queue for the write lock anyway; here the thread that gets it runs every write queued
by then in one transaction, and each caller still gets its own result or its own exception.
With one write at a time (a quiet service) nothing changes: a batch of one. Processes (gunicorn's
workers, the CLI) queue for the same lock through a file beside the database.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError

T = TypeVar("T")

# PostgreSQL's SQLSTATE for a write in a read-only transaction: a server that became a standby
# (a failover), or `default_transaction_read_only`. It passes once the session reconnects to a
# server that takes writes.
READ_ONLY_SQL_TRANSACTION = "25006"


class WriterLock:
    """One writer at a time: a process's threads queue on a lock, processes on a file's flock."""

    # SQLite keeps processes apart too, but a writer it turns away sleeps (1, 2, 5 ... 100 ms)
    # before it looks again, however soon the lock was free: with two gunicorn workers a fifth
    # of the machine sat idle under a load of submits. The kernel wakes an flock's waiter at once.

    def __init__(self, path: str | None) -> None:
        self._threads = threading.Lock()
        self._path = path
        self._descriptor: int | None = None
        self._pid: int | None = None
        self._flocked = False

    def acquire(self) -> None:
        """Wait until no other thread of this process, and no other process, writes."""
        self._threads.acquire()
        descriptor = self._opened()
        if descriptor is None:
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:
            return  # a file system without flock: SQLite's own lock still holds
        except BaseException:
            self._threads.release()
            raise
        self._flocked = True

    def release(self) -> None:
        """Let the next writer in."""
        try:
            if self._flocked:
                self._flocked = False
                assert self._descriptor is not None
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            # Whatever the unlock did, this process's other writers must not wait for ever.
            self._threads.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def _opened(self) -> int | None:
        if self._path is None:
            return None
        if self._pid != os.getpid():
            # Opened again in a forked child: an inherited descriptor would share the parent's
            # lock instead of competing for it.
            self._pid = os.getpid()
            # An flock needs only a read-only descriptor, and the file is readable by all (as
            # SQLite makes the database): a CLI run as another user than the service takes it too.
            try:
                self._descriptor = os.open(
                    self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            except OSError:
                self._descriptor = None  # a read-only folder: SQLite's lock alone, as before
        return self._descriptor


def _writer_lock_path(engine: Engine) -> str | None:
    """Return the file the processes writing to a SQLite database lock (None: in memory)."""
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return f"{database}-writer.lock"


class _Write(Generic[T]):
    """One caller's write, and what came of it once it ran."""

    def __init__(self, work: Callable[[Connection], T]) -> None:
        self.work = work
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def finish(self, result: T | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class WriteInterrupted(SQLAlchemyError):
    """The batch this write was queued in stopped half-way: its leader's thread was interrupted.

    Whether the write was committed is unknown (the interruption may come after the commit);
    each caller's own retry decides what next, as after a lost connection (`is_transient`).
    """


class _BatchFailed(Exception):
    """One write of a batch raised: the batch is rolled back, and each write runs alone."""


class GroupCommit:
    """A process's writes to one SQLite database: one writer at a time, queued writes batched."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Held by whoever writes, in any process: a batch's leader, or a `writing()` block.
        self.lock = WriterLock(_writer_lock_path(engine))
        self._changed = threading.Condition()
        self._queue: list[_Write[Any]] = []
        self._leading = False

    @property
    def waiting(self) -> int:
        """Return how many writes wait for the next commit."""
        with self._changed:
            return len(self._queue)

    @property
    def leading(self) -> bool:
        """Return whether a batch is being committed, or waits for the lock to be."""
        with self._changed:
            return self._leading

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run `work(conn)` in a write transaction, committed with whatever else is queued."""
        write = _Write(work)
        with self._changed:
            self._queue.append(write)
            while self._leading and not write.done:
                self._changed.wait()
            if write.done:
                return write.outcome()
            self._leading = True
            batch, self._queue = self._queue, []
        try:
            with self.lock:
                self._commit(batch)
        except BaseException as exc:
            # A worker stopping mid-commit: whoever waits on this batch must not wait on. A
            # database error to them (an accepted task's record retries, then journals; a write
            # ahead answers 503), since their own threads are not the ones being stopped.
            for one in batch:
                if not one.done:
                    one.finish(error=WriteInterrupted("the write was interrupted"))
            raise exc
        finally:
            with self._changed:
                self._leading = False
                self._changed.notify_all()
        return write.outcome()

    def _commit(self, batch: list[_Write[Any]]) -> None:
        if len(batch) == 1:
            self._commit_alone(batch[0])
            return
        results: list[Any] = []
        try:
            with self.engine.begin() as conn:
                for write in batch:
                    try:
                        results.append(write.work(conn))
                    except Exception as exc:
                        if is_transient(exc):
                            raise
                        raise _BatchFailed() from exc
        except _BatchFailed:
            # A write's own refusal (a limit, a lookup) must not undo the others: each again,
            # alone, so that only its own transaction rolls back.
            for write in batch:
                self._commit_alone(write)
            return
        except Exception as exc:
            # The database itself (busy, locked, gone): every write of the batch failed alike,
            # and each caller's own retry decides what next.
            for write in batch:
                write.finish(error=exc)
            return
        for write, result in zip(batch, results, strict=True):
            write.finish(result)

    def _commit_alone(self, write: _Write[Any]) -> None:
        try:
            with self.engine.begin() as conn:
                result = write.work(conn)
        except Exception as exc:
            write.finish(error=exc)
            return
        write.finish(result)


def is_transient(exc: BaseException) -> bool:
    """Return whether a database error may pass by itself.

    Busy, locked (SQLite's busy timeout, PostgreSQL's lock timeout: OperationalError),
    disconnected, read-only (a failover), or a write whose batch was interrupted.
    """
    if isinstance(exc, WriteInterrupted):
        return True
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or refuses_writes(exc.orig)):
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def refuses_writes(error: BaseException | None) -> bool:
    """Return whether a driver's error is PostgreSQL's refusal to write in a read-only session."""
    return getattr(error, "sqlstate", None) == READ_ONLY_SQL_TRANSACTION
