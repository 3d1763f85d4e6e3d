"""Tasks and who owns them; every read is scoped by the owning account."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    ScalarSelect,
    Select,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from app.store.engine import DirectRead, write, writing
from app.store.tables import FINAL_STATUSES, submissions, task_archive, task_counts, tasks


@dataclass(frozen=True)
class Task:
    """A task the gateway submitted, with the last upstream answer about it."""

    task_id: str
    account_id: int
    key_id: int
    channel: str
    model: str
    status: str
    upstream_body: str
    submitted_at: datetime
    refreshed_at: datetime
    finished_at: datetime | None

    @property
    def is_final(self) -> bool:
        """Return whether upstream can no longer change this task."""
        return self.status in FINAL_STATUSES


# A row of select(tasks) becomes a Task by position: four times cheaper than by column name
# (2% of a running task's query). That needs the fields and the columns in the same order.
if [field.name for field in fields(Task)] != [column.name for column in tasks.columns]:
    raise RuntimeError("Task's fields must be the tasks table's columns, in the same order")

# The hot statements, built once: building one costs more than running it.
_INSERT_TASK = insert(tasks)
# Every task query runs this one.
_SELECT_OWNED_TASK = DirectRead(
    select(tasks).where(
        tasks.c.task_id == bindparam("task_id"),
        tasks.c.account_id == bindparam("account_id"),
        tasks.c.submitted_at > bindparam("after"),
    )
)
# The statuses as literals in the SQL, as in the partial index ix_tasks_running_refreshed: SQLite
# uses a partial index only for a query whose WHERE repeats the index's own terms, and a bound
# parameter is not one (1.1 s for the reconciler's scan of 1M tasks, 9 ms with the index).
_RUNNING_LITERALLY = tasks.c.status.not_in(
    bindparam("final_statuses", sorted(FINAL_STATUSES), expanding=True, literal_execute=True)
)
_CLAIM_REFRESH = (
    update(tasks)
    .where(
        tasks.c.task_id == bindparam("which"),
        tasks.c.refreshed_at <= bindparam("due"),
        tasks.c.status.not_in(FINAL_STATUSES),
    )
    .values(refreshed_at=bindparam("now"))
)
_RECORD_ANSWER = (
    update(tasks)
    .where(tasks.c.task_id == bindparam("which"), tasks.c.status.not_in(FINAL_STATUSES))
    .values(
        status=bindparam("new_status"),
        upstream_body=bindparam("new_body"),
        finished_at=bindparam("new_finished_at"),
    )
)


def record_task(
    engine: Engine,
    *,
    task_id: str,
    account_id: int,
    key_id: int,
    channel: str,
    model: str,
    status: str,
    upstream_body: str,
    now: datetime,
) -> None:
    """Remember a task just created upstream, and who owns it."""
    with writing(engine) as conn:
        conn.execute(
            _INSERT_TASK,
            {
                "task_id": task_id,
                "account_id": account_id,
                "key_id": key_id,
                "channel": channel,
                "model": model,
                "status": status,
                "upstream_body": upstream_body,
                "submitted_at": now,
                "refreshed_at": now,
                "finished_at": now if status in FINAL_STATUSES else None,
            },
        )


def get_owned_task(
    engine: Engine, account_id: int, task_id: str, submitted_after: datetime
) -> Task | None:
    """Return the account's task, or None when it is unknown, another's, or aged out."""
    params = {"task_id": task_id, "account_id": account_id, "after": submitted_after}
    row = _SELECT_OWNED_TASK.first(engine, params)
    return None if row is None else Task(*row)


def claim_refresh(engine: Engine, task_id: str, now: datetime, interval: float) -> bool:
    """Claim the right to ask upstream about a task; at most one claim wins per interval."""
    # A conditional update, so the rule holds across threads, workers and instances alike.
    params = {"which": task_id, "due": now - timedelta(seconds=interval), "now": now}
    # Every query of a running task makes this write and the next: under load, one commit each
    # for many queries (group commit, on SQLite).
    return write(engine, lambda conn: conn.execute(_CLAIM_REFRESH, params).rowcount == 1)


def record_answer(
    engine: Engine, task_id: str, status: str, upstream_body: str, now: datetime
) -> None:
    """Store the latest upstream answer, unless the task had already finished."""
    params = {
        "which": task_id,
        "new_status": status,
        "new_body": upstream_body,
        "new_finished_at": now if status in FINAL_STATUSES else None,
    }
    write(engine, lambda conn: conn.execute(_RECORD_ANSWER, params))


def force_refresh(engine: Engine, task_id: str) -> None:
    """Let the next query of a task go upstream at once (after a cancel, say)."""
    with writing(engine) as conn:
        conn.execute(
            update(tasks)
            .where(tasks.c.task_id == task_id)
            .values(refreshed_at=datetime(1970, 1, 1))
        )


def list_owned_tasks(
    engine: Engine,
    account_id: int,
    *,
    submitted_after: datetime,
    submitted_before: datetime | None = None,
    status: str | None = None,
    model: str | None = None,
    offset: int = 0,
    limit: int = 10,
) -> tuple[int, list[Task]]:
    """Return how many of the account's tasks match, and one page of them, newest first."""
    equal = [tasks.c.account_id == account_id]
    if status is not None:
        equal.append(tasks.c.status == status)
    if model is not None:
        equal.append(tasks.c.model == model)
    conditions = [*equal, tasks.c.submitted_at > submitted_after]
    if submitted_before is not None:
        conditions.append(tasks.c.submitted_at <= submitted_before)
    page = select(tasks).where(*conditions).order_by(tasks.c.submitted_at.desc())
    total = _count_matching(account_id, status, model, submitted_after, submitted_before)
    with engine.connect() as conn:
        # One statement: the hours summed and the edges counted see the same snapshot.
        found = conn.execute(total).scalar_one()
        rows = conn.execute(page.offset(offset).limit(limit)).all()
    return int(found), [Task(*row) for row in rows]


def _count_matching(
    account_id: int,
    status: str | None,
    model: str | None,
    after: datetime,
    before: datetime | None,
) -> Select[Any]:
    """Return the exact count of a list's tasks: whole hours from task_counts, edges from tasks."""
    equal = [tasks.c.account_id == account_id]
    counted = [task_counts.c.account_id == account_id]
    if status is not None:
        equal.append(tasks.c.status == status)
        counted.append(task_counts.c.status == status)
    if model is not None:
        equal.append(tasks.c.model == model)
        counted.append(task_counts.c.model == model)

    def counted_from_tasks(*span: ColumnElement[bool]) -> ScalarSelect[Any]:
        return select(func.count()).select_from(tasks).where(*equal, *span).scalar_subquery()

    in_range = [tasks.c.submitted_at > after]
    if before is not None:
        in_range.append(tasks.c.submitted_at <= before)
    # The whole hours inside (after, before]: from the first that starts after `after` to the
    # last that ends by `before`. A range within two hours is counted from tasks alone.
    try:
        first = _hour_of(after) + timedelta(hours=1)
    except OverflowError:
        return select(counted_from_tasks(*in_range))
    end = _hour_of(before) if before is not None else None
    if end is not None and end <= first:
        return select(counted_from_tasks(*in_range))
    hours = [task_counts.c.hour >= first]
    if end is not None:
        hours.append(task_counts.c.hour < end)
    summed = (
        select(func.coalesce(func.sum(task_counts.c.n), 0))
        .where(*counted, *hours)
        .scalar_subquery()
    )
    total = summed + counted_from_tasks(tasks.c.submitted_at > after, tasks.c.submitted_at < first)
    if before is not None and end is not None:
        total = total + counted_from_tasks(
            tasks.c.submitted_at >= end, tasks.c.submitted_at <= before
        )
    return select(total)


def _hour_of(moment: datetime) -> datetime:
    """Return the start of the hour a time falls in, as task_counts keys it."""
    return moment.replace(minute=0, second=0, microsecond=0)


def due_for_refresh(
    engine: Engine, now: datetime, interval: float, submitted_after: datetime, limit: int
) -> list[Task]:
    """Return running tasks whose last refresh is older than the interval, stalest first."""
    query = (
        select(tasks)
        .where(
            _RUNNING_LITERALLY,
            tasks.c.refreshed_at <= now - timedelta(seconds=interval),
            tasks.c.submitted_at > submitted_after,
        )
        .order_by(tasks.c.refreshed_at)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [Task(*row) for row in conn.execute(query)]


def archive_tasks(engine: Engine, submitted_before: datetime, now: datetime, limit: int) -> int:
    """Move up to `limit` tasks submitted before a time out of the hot table; return how many.

    What a usage report needs (owner, key, channel, model, final status, DashScope's `usage`)
    is kept in task_archive; the answers themselves go.
    """
    with writing(engine) as conn:
        rows = conn.execute(
            select(tasks)
            .where(tasks.c.submitted_at <= submitted_before)
            .order_by(tasks.c.submitted_at)
            .limit(limit)
        ).all()
        if not rows:
            return 0
        moved = [Task(*row) for row in rows]
        conn.execute(
            insert(task_archive),
            [
                {
                    "task_id": task.task_id,
                    "account_id": task.account_id,
                    "key_id": task.key_id,
                    "channel": task.channel,
                    "model": task.model,
                    "status": task.status,
                    "usage": usage_of(task.upstream_body),
                    "submitted_at": task.submitted_at,
                    "finished_at": task.finished_at,
                    "archived_at": now,
                }
                for task in moved
            ],
        )
        conn.execute(delete(tasks).where(tasks.c.task_id.in_([task.task_id for task in moved])))
        # The triggers took the moved tasks off task_counts; an hour all of whose tasks went
        # leaves rows of zero, which no list needs once the hour is past the window.
        conn.execute(
            delete(task_counts).where(
                task_counts.c.n == 0, task_counts.c.hour < _hour_of(submitted_before)
            )
        )
        # Resolved submissions of the same age: their tasks' owners are in the archive now.
        # A reservation still held stays with its submission until it is settled.
        conn.execute(
            delete(submissions).where(
                submissions.c.sent_at <= submitted_before,
                submissions.c.state != "in_flight",
                or_(
                    submissions.c.billing_state.is_(None), submissions.c.billing_state != "reserved"
                ),
            )
        )
    return len(moved)


def usage_of(upstream_body: str) -> str | None:
    """Return the `usage` object of a stored answer as JSON text, or None."""
    try:
        usage = json.loads(upstream_body).get("usage")
    except (ValueError, AttributeError):
        return None
    return json.dumps(usage) if isinstance(usage, dict) else None
