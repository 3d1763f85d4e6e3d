"""A growing store: exact list totals from task_counts, the reconciler's scans on their indexes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select, text

from app.store import create_key, find_caller, hash_secret, list_owned_tasks, open_engine
from app.store.submissions import (
    AcceptedTask,
    Owner,
    in_flight,
    record_accepted,
    record_orphan,
    write_ahead,
)
from app.store.tables import task_counts, tasks
from app.store.tasks import archive_tasks, due_for_refresh, record_answer, record_task

MODELS = ("wan2.5-t2v-preview", "wan2.2-t2v-plus")
STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED")
# A fixed clock, a little past an hour's start, so that hours and their edges are known.
NOW = datetime(2026, 12, 2, 20, 17, 31, 250000)
RETENTION = timedelta(hours=24)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """Return a migrated store."""
    engine = open_engine(database_url)
    yield engine
    engine.dispose()


def owners(engine: Engine) -> list[tuple[int, int]]:
    """Return (account id, key id) of two accounts."""
    found = []
    for name in ("acme", "globex"):
        caller = find_caller(engine, hash_secret(create_key(engine, name)))
        assert caller is not None
        found.append((caller.account_id, caller.key_id))
    return found


def plain_count(engine: Engine, account_id: int, **where: Any) -> int:
    """Return COUNT(*) of the list's conditions over tasks, as the list counted before."""
    conditions = [tasks.c.account_id == account_id, tasks.c.submitted_at > where["after"]]
    if where.get("before") is not None:
        conditions.append(tasks.c.submitted_at <= where["before"])
    if where.get("status") is not None:
        conditions.append(tasks.c.status == where["status"])
    if where.get("model") is not None:
        conditions.append(tasks.c.model == where["model"])
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(*conditions)).scalar_one())


def filters() -> Iterator[dict[str, Any]]:
    """Yield every combination of the list's filters, with ranges on and off hour edges."""
    cutoff = NOW - RETENTION
    ranges = [
        (cutoff, None),
        (cutoff, NOW),
        (NOW - timedelta(hours=5), NOW - timedelta(hours=2)),  # whole hours, edges on them
        (NOW - timedelta(hours=7, minutes=3), NOW - timedelta(hours=1, seconds=59)),
        (NOW - timedelta(minutes=50), NOW - timedelta(minutes=10)),  # within two hours
        (NOW - timedelta(minutes=3), NOW - timedelta(minutes=2)),  # within one hour
        (NOW - timedelta(hours=30), NOW - timedelta(hours=20)),  # starts before the window
        (NOW, None),
    ]
    for after, before in ranges:
        for status in (None, *STATUSES):
            for model in (None, *MODELS):
                yield {"after": after, "before": before, "status": status, "model": model}


def assert_totals_exact(engine: Engine, account_ids: list[int]) -> None:
    """Check the list's total against a plain COUNT for every filter and account."""
    for account_id in account_ids:
        for where in filters():
            total, _page = list_owned_tasks(
                engine,
                account_id,
                submitted_after=where["after"],
                submitted_before=where["before"],
                status=where["status"],
                model=where["model"],
                limit=1,
            )
            assert total == plain_count(engine, account_id, **where), (account_id, where)


def test_list_totals_stay_exact_through_inserts_status_changes_and_archiving(
    engine: Engine,
) -> None:
    (acme, acme_key), (globex, globex_key) = owners(engine)
    n = 0
    # Tasks over 30 hours, some exactly on an hour's start, some just before the next one.
    for minutes in range(0, 30 * 60, 37):
        for offset in (timedelta(0), timedelta(minutes=59, seconds=59, microseconds=999999)):
            n += 1
            account, key = (acme, acme_key) if n % 3 else (globex, globex_key)
            submitted = (NOW - timedelta(minutes=minutes)).replace(minute=0, second=0) + offset
            submitted = min(submitted, NOW)
            record_task(
                engine,
                task_id=f"task-{n}",
                account_id=account,
                key_id=key,
                channel="primary",
                model=MODELS[n % 2],
                status=STATUSES[n % 2],
                upstream_body="{}",
                now=submitted,
            )
    # Tasks written by the other paths: an accepted submission, and an orphan.
    submission_id, _ = write_ahead(
        engine,
        account_id=acme,
        key_id=acme_key,
        model=MODELS[0],
        channel="primary",
        service_path="/x",
        body_sha256="0" * 64,
        now=NOW - timedelta(hours=3, minutes=1),
    )
    accepted = AcceptedTask(submission_id, "task-accepted", "PENDING", "{}", NOW)
    assert record_accepted(engine, accepted, by="answer")
    assert not record_accepted(engine, accepted, by="journal")  # counted once
    orphan = AcceptedTask(0, "task-orphan", "RUNNING", "{}", NOW)
    owner = Owner(acme, acme_key, "primary", MODELS[1], NOW - timedelta(hours=2))
    assert record_orphan(engine, orphan, owner, None)
    assert not record_orphan(engine, orphan, owner, None)
    assert_totals_exact(engine, [acme, globex])

    # Status changes: to another running status, to a final one, and a final one left as it is.
    for i in range(1, n + 1, 3):
        record_answer(engine, f"task-{i}", "RUNNING", "{}", NOW)
    for i in range(1, n + 1, 4):
        record_answer(engine, f"task-{i}", "SUCCEEDED", "{}", NOW)
    for i in range(1, n + 1, 5):
        record_answer(engine, f"task-{i}", "FAILED", "{}", NOW)  # ignored once final
    record_answer(engine, "task-accepted", "FAILED", "{}", NOW)
    assert_totals_exact(engine, [acme, globex])

    # Archiving the tasks past the window, in small batches.
    while archive_tasks(engine, NOW - RETENTION, NOW, limit=7):
        pass
    with engine.connect() as conn:
        left = conn.execute(select(func.min(tasks.c.submitted_at))).scalar_one()
        hours = conn.execute(select(task_counts.c.hour, task_counts.c.n)).all()
    assert left > NOW - RETENTION
    # What the archive emptied is gone from task_counts too; what is left adds up.
    assert all(
        hour >= (NOW - RETENTION).replace(minute=0, second=0, microsecond=0) for hour, _ in hours
    )
    assert sum(count for _, count in hours) == plain_count(engine, acme, after=datetime.min) + (
        plain_count(engine, globex, after=datetime.min)
    )
    assert_totals_exact(engine, [acme, globex])


def test_a_task_changed_by_hand_is_counted_where_it_now_is(engine: Engine) -> None:
    # An operator's UPDATE of the owner, model or submit time moves the count with the task.
    (acme, key), (globex, _) = owners(engine)
    for i in range(4):
        record_task(
            engine,
            task_id=f"t{i}",
            account_id=acme,
            key_id=key,
            channel="primary",
            model=MODELS[0],
            status="RUNNING",
            upstream_body="{}",
            now=NOW - timedelta(hours=i),
        )
    with engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.task_id == "t1").values(account_id=globex))
        conn.execute(tasks.update().where(tasks.c.task_id == "t2").values(model=MODELS[1]))
        conn.execute(
            tasks.update()
            .where(tasks.c.task_id == "t3")
            .values(submitted_at=NOW - timedelta(hours=9))
        )
        conn.execute(tasks.delete().where(tasks.c.task_id == "t0"))
    assert_totals_exact(engine, [acme, globex])


class Statements:
    """The SQL an engine sends, with its parameters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: list[tuple[str, Any]] = []

    def __enter__(self) -> Statements:
        event.listen(self.engine, "before_cursor_execute", self._remember)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._remember)

    def _remember(self, _conn: Any, _cursor: Any, statement: str, params: Any, *_a: Any) -> None:
        self.seen.append((statement, params))

    def plan(self, table: str) -> str:
        """Return SQLite's query plan of the one SELECT sent from the table."""
        [(statement, params)] = [
            (sql, params) for sql, params in self.seen if f"FROM {table}" in sql
        ]
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params).all()
        return "\n".join(str(row[-1]) for row in rows)


def test_the_reconciler_scans_read_their_partial_indexes(tmp_path: Any) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'plans.sqlite3'}")
    try:
        with Statements(engine) as sent:
            due_for_refresh(engine, NOW, 5, NOW - RETENTION, limit=10)
        assert "USING INDEX ix_tasks_running_refreshed" in sent.plan("tasks")
        with Statements(engine) as sent:
            in_flight(engine, sent_before=NOW)
        plan = sent.plan("submissions")
        assert "USING INDEX ix_submissions_in_flight" in plan
        assert "TEMP B-TREE" not in plan  # read in its order, not sorted afterwards
    finally:
        engine.dispose()


def test_list_totals_read_the_counts_not_every_task(tmp_path: Any) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'plans.sqlite3'}")
    try:
        for where in ({}, {"status": "RUNNING"}, {"model": MODELS[0]}):
            with Statements(engine) as sent:
                list_owned_tasks(engine, 1, submitted_after=NOW - RETENTION, **where)
            [(count, params)] = [(s, p) for s, p in sent.seen if "task_counts" in s]
            with engine.connect() as conn:
                plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {count}", params).all()
            details = [str(row[-1]) for row in plan]
            assert any("task_counts" in line for line in details)
            # The edge is counted on an index whose columns answer it alone.
            assert any("COVERING INDEX ix_tasks_account" in line for line in details), details
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM task_counts")).scalar_one() == 0
    finally:
        engine.dispose()
