"""Submissions: every submit, written before it leaves for DashScope, and what came of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from app.billing.ledger import (
    RESERVED,
    Reservation,
    Reserved,
    period_of,
    release_submission,
    reserve,
)
from app.store.engine import writing
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


@dataclass(frozen=True)
class AcceptedTask:
    """What the gateway records when DashScope accepted a submission."""

    submission_id: int
    task_id: str
    status: str
    upstream_body: str
    accepted_at: datetime


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
) -> tuple[int, Reserved | None]:
    """Record a submit about to be sent, with its estimate reserved; return its id.

    One transaction: the submission, the reservation's ledger row and the limit check stand
    or fall together (LimitExceeded leaves no trace).
    """
    estimate = reservation.estimate if reservation is not None else None
    with writing(engine) as conn:
        submission_id = int(
            conn.execute(
                insert(submissions)
                .values(
                    account_id=account_id,
                    key_id=key_id,
                    model=model,
                    channel=channel,
                    service_path=service_path,
                    body_sha256=body_sha256,
                    state=IN_FLIGHT,
                    sent_at=now,
                    estimate=estimate.amount if estimate else None,
                    estimate_tier=estimate.tier if estimate else None,
                    estimate_seconds=estimate.seconds if estimate else None,
                    billing_state=RESERVED if estimate else None,
                    billing_period=period_of(now) if estimate else None,
                )
                .returning(submissions.c.id)
            ).scalar_one()
        )
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


def record_accepted(engine: Engine, accepted: AcceptedTask, by: str) -> bool:
    """Record the task DashScope created for a submission; False if it was recorded already.

    One transaction, and idempotent: recording the same task twice (a journal replayed
    twice, two reconcilers adopting at once) leaves one task and one resolved submission.
    """
    with writing(engine) as conn:
        row = conn.execute(
            select(
                submissions.c.account_id,
                submissions.c.key_id,
                submissions.c.channel,
                submissions.c.model,
                submissions.c.sent_at,
            ).where(submissions.c.id == accepted.submission_id)
        ).first()
        if row is None:
            raise LookupError(f"no submission {accepted.submission_id}")
        if not _insert_task_once(conn, accepted, Owner(*row)):
            return False
        conn.execute(
            update(submissions)
            .where(submissions.c.id == accepted.submission_id)
            .values(
                state=ACCEPTED,
                task_id=accepted.task_id,
                resolved_at=accepted.accepted_at,
                resolved_by=by,
            )
        )
        return True


@dataclass(frozen=True)
class Owner:
    """Who sent a submission, where and when: what its task is recorded under."""

    account_id: int
    key_id: int
    channel: str
    model: str
    sent_at: datetime


def record_orphan(engine: Engine, accepted: AcceptedTask, owner: Owner) -> bool:
    """Record a task whose submission row is gone (a database restored from a backup)."""
    with writing(engine) as conn:
        return _insert_task_once(conn, accepted, owner)


def _insert_task_once(conn: Connection, accepted: AcceptedTask, owner: Owner) -> bool:
    if conn.execute(select(tasks.c.task_id).where(tasks.c.task_id == accepted.task_id)).first():
        return False
    try:
        # A savepoint, so that losing a race to the same insert keeps the transaction usable.
        with conn.begin_nested():
            conn.execute(
                insert(tasks).values(
                    task_id=accepted.task_id,
                    account_id=owner.account_id,
                    key_id=owner.key_id,
                    channel=owner.channel,
                    model=owner.model,
                    status=accepted.status,
                    upstream_body=accepted.upstream_body,
                    submitted_at=owner.sent_at,
                    refreshed_at=accepted.accepted_at,
                    finished_at=accepted.accepted_at if accepted.status in FINAL_STATUSES else None,
                )
            )
    except IntegrityError:
        return False
    return True


def in_flight(engine: Engine, sent_before: datetime) -> list[Submission]:
    """Return the submissions still in flight that were sent before a time, oldest first."""
    query = (
        select(
            submissions.c.id,
            submissions.c.account_id,
            submissions.c.key_id,
            submissions.c.model,
            submissions.c.channel,
            submissions.c.service_path,
            submissions.c.body_sha256,
            submissions.c.sent_at,
        )
        .where(submissions.c.state == IN_FLIGHT, submissions.c.sent_at < sent_before)
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
