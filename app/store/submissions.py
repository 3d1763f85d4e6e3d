"""Submissions: every submit, written before it leaves for DashScope, and what came of it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Select,
    String,
    Text,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from app.billing.ledger import (
    RESERVED,
    Reservation,
    Reserved,
    period_of,
    release_submission,
    reserve,
)
from app.billing.prices import Estimate
from app.store.engine import write, writing
from app.store.tables import FINAL_STATUSES, submissions, task_archive, tasks

IN_FLIGHT = "in_flight"
ACCEPTED = "accepted"
NOT_CREATED = "not_created"
AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class Submission:
    """A submit the gateway sent, or was about to send, and whose outcome it may not know."""

    id: int
    account_id: int
    key_id: int
    model: str
    channel: str
    service_path: str
    body_sha256: str
    sent_at: datetime
    # SHA-256 of the body's `input.prompt`; None when unknown (no prompt, an older row).
    prompt_sha256: str | None = None


def hash_prompt(prompt: object) -> str | None:
    """Return the hash a submission keeps of its prompt, or None for no prompt."""
    # What DashScope echoes of a task's input (`orig_prompt`, once it SUCCEEDED): a string.
    if not isinstance(prompt, str) or not prompt:
        return None
    return hashlib.sha256(prompt.encode()).hexdigest()


@dataclass(frozen=True)
class AcceptedTask:
    """What the gateway records when DashScope accepted a submission."""

    submission_id: int
    task_id: str
    status: str
    upstream_body: str
    accepted_at: datetime


# Built once: every submit runs it (SQLAlchemy caches its compiled form either way).
_WRITE_AHEAD = insert(submissions).returning(submissions.c.id)


def write_ahead(
    engine: Engine,
    *,
    account_id: int,
    key_id: int,
    model: str,
    channel: str,
    service_path: str,
    body_sha256: str,
    now: datetime,
    reservation: Reservation | None = None,
    prompt_sha256: str | None = None,
) -> tuple[int, Reserved | None]:
    """Record a submit about to be sent, with its estimate reserved; return its id.

    One transaction: the submission, the reservation's ledger row and the limit check stand
    or fall together (LimitExceeded leaves no trace).
    """
    estimate = reservation.estimate if reservation is not None else None
    values = {
        "account_id": account_id,
        "key_id": key_id,
        "model": model,
        "channel": channel,
        "service_path": service_path,
        "body_sha256": body_sha256,
        "prompt_sha256": prompt_sha256,
        "state": IN_FLIGHT,
        "sent_at": now,
        "estimate": estimate.amount if estimate else None,
        "estimate_tier": estimate.tier if estimate else None,
        "estimate_seconds": estimate.seconds if estimate else None,
        "billing_state": RESERVED if estimate else None,
        "billing_period": period_of(now) if estimate else None,
    }

    def write_and_reserve(conn: Connection) -> tuple[int, Reserved | None]:
        submission_id = int(conn.execute(_WRITE_AHEAD, values).scalar_one())
        if reservation is None:
            return submission_id, None
        reserved = reserve(
            conn,
            reservation,
            account_id=account_id,
            key_id=key_id,
            submission_id=submission_id,
            model=model,
            now=now,
        )
        return submission_id, reserved

    return write(engine, write_and_reserve)


def move_to_channel(engine: Engine, submission_id: int, channel: str, now: datetime) -> None:
    """Record that a submission is about to be sent to another channel (failover)."""
    with writing(engine) as conn:
        conn.execute(
            update(submissions)
            .where(submissions.c.id == submission_id, submissions.c.state == IN_FLIGHT)
            .values(channel=channel, sent_at=now)
        )


def mark_not_created(engine: Engine, submission_id: int, now: datetime, by: str) -> bool:
    """Record that a submission provably created no task, releasing its reservation.

    False if it was resolved already; the release happens once, with the resolution.
    """
    with writing(engine) as conn:
        resolved = bool(
            conn.execute(
                update(submissions)
                .where(submissions.c.id == submission_id, submissions.c.state == IN_FLIGHT)
                .values(state=NOT_CREATED, resolved_at=now, resolved_by=by)
            ).rowcount
        )
        if resolved:
            release_submission(conn, submission_id, now)
        return resolved


def mark_ambiguous(engine: Engine, submission_id: int, now: datetime) -> None:
    """Leave a submission to an operator: the listing cannot tell which task is its own."""
    with writing(engine) as conn:
        conn.execute(
            update(submissions)
            .where(submissions.c.id == submission_id, submissions.c.state == IN_FLIGHT)
            .values(state=AMBIGUOUS, resolved_at=now, resolved_by="reconciler")
        )


def _insert_ignoring_duplicates(dialect: str) -> Any:
    """Return the dialect's INSERT INTO tasks that leaves an existing task as it is."""
    module = sqlite if dialect == "sqlite" else postgresql
    return module.insert(tasks).on_conflict_do_nothing(index_elements=[tasks.c.task_id])


# The task of an accepted submission, its owner copied from the submission row: one statement,
# built once per dialect.
_TASK_OF_SUBMISSION = {
    dialect: _insert_ignoring_duplicates(dialect)
    .from_select(
        [
            "task_id",
            "account_id",
            "key_id",
            "channel",
            "model",
            "status",
            "upstream_body",
            "submitted_at",
            "refreshed_at",
            "finished_at",
        ],
        select(
            bindparam("task_id", type_=String),
            submissions.c.account_id,
            submissions.c.key_id,
            submissions.c.channel,
            submissions.c.model,
            bindparam("status", type_=String),
            bindparam("upstream_body", type_=Text),
            submissions.c.sent_at,
            bindparam("accepted_at", type_=DateTime),
            bindparam("finished_at", type_=DateTime),
        ).where(submissions.c.id == bindparam("submission_id")),
    )
    # What was inserted, by RETURNING: psycopg's rowcount of this statement is -1 under
    # SQLAlchemy 2.1, which made a task recorded twice look new on PostgreSQL.
    .returning(tasks.c.task_id)
    for dialect in ("sqlite", "postgresql")
}
_RESOLVE_ACCEPTED = (
    update(submissions)
    .where(submissions.c.id == bindparam("submission_id"))
    .values(
        state=ACCEPTED,
        task_id=bindparam("task_id"),
        resolved_at=bindparam("accepted_at"),
        resolved_by=bindparam("resolved_by"),
    )
)


def record_accepted(
    engine: Engine, accepted: AcceptedTask, by: str, owner: Owner | None = None
) -> bool:
    """Record the task DashScope created for a submission; False if it was recorded already.

    One transaction, and idempotent: recording the same task twice (a journal replayed
    twice, two reconcilers adopting at once) leaves one task and one resolved submission.
    With an `owner` (a journal line's), the submission must be that owner's and unresolved or
    resolved to this task, else LookupError: after a restore from a backup, the line's
    submission id may name another submission now.
    """
    params = {
        "submission_id": accepted.submission_id,
        "task_id": accepted.task_id,
        "status": accepted.status,
        "upstream_body": accepted.upstream_body,
        "accepted_at": accepted.accepted_at,
        "finished_at": accepted.accepted_at if accepted.status in FINAL_STATUSES else None,
        "resolved_by": by,
    }

    def matching() -> Select[tuple[int]]:
        # Built only when asked: a submit's own record (no owner, not recorded yet) never is.
        matches = submissions.c.id == accepted.submission_id
        if owner is not None:
            matches &= (
                (submissions.c.account_id == owner.account_id)
                & (submissions.c.key_id == owner.key_id)
                & (submissions.c.model == owner.model)
                & (submissions.c.task_id.is_(None) | (submissions.c.task_id == accepted.task_id))
            )
        return select(submissions.c.id).where(matches)

    def record(conn: Connection) -> bool:
        if owner is not None and not conn.execute(matching()).first():
            raise LookupError(f"no submission {accepted.submission_id} of this owner")
        inserted = conn.execute(_TASK_OF_SUBMISSION[engine.dialect.name], params).first()
        if inserted is None:
            exists = conn.execute(matching()).first()
            if exists is None:
                raise LookupError(f"no submission {accepted.submission_id}")
            return False  # the task was recorded already
        conn.execute(_RESOLVE_ACCEPTED, params)
        return True

    return write(engine, record)


@dataclass(frozen=True)
class Owner:
    """Who sent a submission, where, when and what: what its task is recorded under."""

    account_id: int
    key_id: int
    channel: str
    model: str
    sent_at: datetime
    service_path: str = ""
    body_sha256: str = ""


def record_orphan(
    engine: Engine, accepted: AcceptedTask, owner: Owner, cost: Estimate | None
) -> bool:
    """Record a task whose submission row is gone (a database restored from a backup).

    The submission is written anew, resolved to the task, with its estimate reserved (no
    limit refuses a task that exists), so the task is owned, listed and charged once like any
    other; False if the task was recorded already.
    """
    who = {
        "account_id": owner.account_id,
        "key_id": owner.key_id,
        "channel": owner.channel,
        "model": owner.model,
    }
    with writing(engine) as conn:
        inserted = conn.execute(
            _insert_ignoring_duplicates(engine.dialect.name)
            .values(
                **who,
                task_id=accepted.task_id,
                status=accepted.status,
                upstream_body=accepted.upstream_body,
                submitted_at=owner.sent_at,
                refreshed_at=accepted.accepted_at,
                finished_at=accepted.accepted_at if accepted.status in FINAL_STATUSES else None,
            )
            # RETURNING, not rowcount: psycopg's rowcount of an INSERT ... ON CONFLICT is not
            # to be trusted under SQLAlchemy 2.1 (see _TASK_OF_SUBMISSION).
            .returning(tasks.c.task_id)
        ).first()
        if inserted is None:
            return False
        submission_id = conn.execute(
            insert(submissions)
            .values(
                **who,
                service_path=owner.service_path,
                body_sha256=owner.body_sha256,
                state=ACCEPTED,
                task_id=accepted.task_id,
                sent_at=owner.sent_at,
                resolved_at=accepted.accepted_at,
                resolved_by="journal",
                estimate=cost.amount if cost else None,
                estimate_tier=cost.tier if cost else None,
                estimate_seconds=cost.seconds if cost else None,
                billing_state=RESERVED if cost else None,
                billing_period=period_of(accepted.accepted_at) if cost else None,
            )
            .returning(submissions.c.id)
        ).scalar_one()
        if cost is not None:
            reserve(
                conn,
                Reservation(cost),
                account_id=owner.account_id,
                key_id=owner.key_id,
                submission_id=submission_id,
                model=owner.model,
                now=accepted.accepted_at,
                enforce_limit=False,
            )
        return True


# As the partial index ix_submissions_in_flight has it: SQLite uses a partial index only for a
# query whose WHERE repeats its terms, literals included, and a bound parameter is not one.
_IN_FLIGHT_LITERALLY = submissions.c.state == bindparam(
    "in_flight", IN_FLIGHT, literal_execute=True
)


# In the order of Submission's fields.
_SUBMISSION_COLUMNS = (
    submissions.c.id,
    submissions.c.account_id,
    submissions.c.key_id,
    submissions.c.model,
    submissions.c.channel,
    submissions.c.service_path,
    submissions.c.body_sha256,
    submissions.c.sent_at,
    submissions.c.prompt_sha256,
)


def in_flight(engine: Engine, sent_before: datetime) -> list[Submission]:
    """Return the submissions still in flight that were sent before a time, oldest first."""
    query = (
        select(*_SUBMISSION_COLUMNS)
        .where(_IN_FLIGHT_LITERALLY, submissions.c.sent_at < sent_before)
        .order_by(submissions.c.sent_at, submissions.c.id)
    )
    with engine.connect() as conn:
        return [Submission(*row) for row in conn.execute(query)]


def ambiguous_between(
    engine: Engine, channel: str, model: str, sent_after: datetime, sent_before: datetime
) -> list[Submission]:
    """Return a channel's submissions of a model left to an operator, sent in a time range."""
    query = (
        select(*_SUBMISSION_COLUMNS)
        .where(
            submissions.c.state == AMBIGUOUS,
            submissions.c.channel == channel,
            submissions.c.model == model,
            submissions.c.sent_at >= sent_after,
            submissions.c.sent_at < sent_before,
        )
        .order_by(submissions.c.sent_at, submissions.c.id)
    )
    with engine.connect() as conn:
        return [Submission(*row) for row in conn.execute(query)]


def known_task_ids(engine: Engine, task_ids: list[str]) -> set[str]:
    """Return which of these task ids the gateway has recorded already (archived included)."""
    if not task_ids:
        return set()
    with engine.connect() as conn:
        return {
            task_id
            for table in (tasks, task_archive)
            for task_id in conn.execute(
                select(table.c.task_id).where(table.c.task_id.in_(task_ids))
            ).scalars()
        }
