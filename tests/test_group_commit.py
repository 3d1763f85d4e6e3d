"""Writes queued behind a writer share one commit, and each caller gets only its own outcome."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, event, select, text
from sqlalchemy.exc import SQLAlchemyError

from app.store import open_engine
from app.store.engine import group_commit_of, write, writing
from app.store.group_commit import WriteInterrupted, is_transient
from app.store.tables import accounts

THREADS = 12


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_engine(f"sqlite:///{tmp_path / 'gateway.sqlite3'}", pool_size=THREADS)
    yield engine
    engine.dispose()


def commits_of(engine: Engine) -> list[int]:
    """Return a list that grows by one at each commit the engine makes."""
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    return commits


def add_account(name: str) -> Callable[[Connection], int]:
    def work(conn: Connection) -> int:
        return int(
            conn.execute(
                text(
                    "INSERT INTO accounts (name, created_at) VALUES (:n, '2026-12-03') RETURNING id"
                ),
                {"n": name},
            ).scalar_one()
        )

    return work


def account_names(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(accounts.c.name)).scalars())


def queued_behind_a_writer(
    engine: Engine, works: list[Callable[[Connection], object]]
) -> list[tuple[str, object]]:
    """Start one thread per work while a writer holds the lock, let them all queue, release."""
    outcomes: list[tuple[str, object]] = [("none", None)] * len(works)

    def call(index: int) -> None:
        try:
            outcomes[index] = ("result", write(engine, works[index]))
        except Exception as exc:
            outcomes[index] = ("error", exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(works))]
    group = group_commit_of(engine)
    assert group is not None
    with writing(engine):
        threads[0].start()
        # The first caller leads a batch of its own, waiting for the lock this block holds.
        wait_until(lambda: group.leading)
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: group.waiting == len(works) - 1)
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writes did not queue"
        time.sleep(0.005)


def test_writes_queued_behind_a_writer_share_one_commit(engine: Engine) -> None:
    commits = commits_of(engine)
    names = [f"team-{i}" for i in range(THREADS)]

    outcomes = queued_behind_a_writer(engine, [add_account(name) for name in names])

    assert [kind for kind, _ in outcomes] == ["result"] * THREADS
    assert len({value for _, value in outcomes}) == THREADS  # each got its own row's id
    assert account_names(engine) == set(names)
    # The writer's own, the first caller's (a batch of itself), then everyone queued behind it.
    assert len(commits) == 3


def test_a_write_that_raises_is_undone_alone(engine: Engine) -> None:
    def add_then_refuse(conn: Connection) -> int:
        add_account("refused")(conn)
        raise LookupError("refused after writing")

    works = [add_account(f"team-{i}") for i in range(THREADS - 1)]
    works.insert(THREADS // 2, add_then_refuse)

    outcomes = queued_behind_a_writer(engine, works)

    errors = [value for kind, value in outcomes if kind == "error"]
    assert len(errors) == 1
    assert isinstance(errors[0], LookupError)
    assert account_names(engine) == {f"team-{i}" for i in range(THREADS - 1)}


def test_a_database_error_in_a_batch_reaches_every_caller_and_commits_nothing(
    engine: Engine,
) -> None:
    def broken(conn: Connection) -> None:
        conn.execute(text("INSERT INTO no_such_table VALUES (1)"))

    works = [add_account(f"team-{i}") for i in range(THREADS - 1)]
    works.insert(THREADS // 2, broken)

    outcomes = queued_behind_a_writer(engine, works)

    # The first caller commits alone; the batch behind it fails whole, for everyone in it.
    assert outcomes[0][0] == "result"
    assert [kind for kind, _ in outcomes[1:]] == ["error"] * (THREADS - 1)
    assert account_names(engine) == {"team-0"}


def test_a_write_alone_commits_at_once(engine: Engine) -> None:
    commits = commits_of(engine)
    assert write(engine, add_account("alone")) >= 1
    assert len(commits) == 1
    assert account_names(engine) == {"alone"}


def test_a_batch_whose_leader_is_interrupted_hands_the_others_a_retryable_database_error(
    engine: Engine,
) -> None:
    # What a signal does to the thread committing a batch (KeyboardInterrupt, SystemExit): it
    # stops there, and whoever queued in that batch learns of it as of a refused write, which
    # the record of an accepted task retries and then journals, never a 500.
    def interrupted(conn: Connection) -> None:
        add_account("interrupted")(conn)
        raise KeyboardInterrupt

    outcomes: dict[str, object] = {}

    def call(name: str, work: Callable[[Connection], object]) -> None:
        try:
            outcomes[name] = write(engine, work)
        except BaseException as exc:  # the interrupt itself, in whichever thread led
            outcomes[name] = exc

    group = group_commit_of(engine)
    assert group is not None
    threads = {
        "first": threading.Thread(target=call, args=("first", add_account("first"))),
        "interrupted": threading.Thread(target=call, args=("interrupted", interrupted)),
        "queued": threading.Thread(target=call, args=("queued", add_account("queued"))),
    }
    with writing(engine):
        threads["first"].start()
        wait_until(lambda: group.leading)  # a batch of its own, waiting for this block's lock
        threads["interrupted"].start()
        threads["queued"].start()
        wait_until(lambda: group.waiting == 2)  # the next batch: both, whoever leads it
    for thread in threads.values():
        thread.join(timeout=30)

    assert isinstance(outcomes["first"], int)
    # The leader of the second batch is interrupted; the other caller gets a database error.
    kinds = {type(outcomes["interrupted"]), type(outcomes["queued"])}
    assert kinds == {KeyboardInterrupt, WriteInterrupted}, outcomes
    [error] = [e for e in outcomes.values() if isinstance(e, WriteInterrupted)]
    assert isinstance(error, SQLAlchemyError)
    assert is_transient(error)
    assert account_names(engine) == {"first"}  # the interrupted batch is rolled back whole
    # Nothing is left holding the lock: the next write (a retry) commits.
    assert not group.leading
    assert write(engine, add_account("queued")) >= 1
    assert account_names(engine) == {"first", "queued"}


# Another process's write, started while this one holds the writer lock: it reports when it
# waits and when it has written.
OTHER_PROCESS_WRITE = """
import sys
from sqlalchemy import text
from app.store import open_engine
from app.store.engine import write
engine = open_engine(sys.argv[1], upgrade=False)
print("ready", flush=True)
write(engine, lambda conn: conn.execute(
    text("INSERT INTO accounts (name, created_at) VALUES ('other', '2026-12-03')")))
print("written", flush=True)
"""


def flock_waiters(pid: int) -> bool:
    """Return whether a process waits for an flock (a `->` line of /proc/locks)."""
    with open("/proc/locks") as locks:
        fields = [line.split() for line in locks]
    return any(f[1:3] == ["->", "FLOCK"] and f[5] == str(pid) for f in fields)


def test_processes_queue_for_the_writer_lock_without_sleeping(engine: Engine) -> None:
    with writing(engine):  # no statement yet: SQLite itself holds no lock, only ours is held
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_PROCESS_WRITE, str(engine.url)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        wait_until(lambda: flock_waiters(other.pid))
        assert account_names(engine) == set()
    # Woken by the kernel when the lock is let go, not by polling.
    assert other.stdout.readline().strip() == "written"
    assert other.wait(timeout=30) == 0
    assert account_names(engine) == {"other"}
