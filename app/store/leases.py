"""Leases: which one process, of every worker and instance, does a job for a while."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, insert, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.store.engine import writing
from app.store.tables import leases, submissions


def acquire_lease(engine: Engine, name: str, holder: str, now: datetime, seconds: float) -> bool:
    """Take or renew the lease for `seconds`; False while another holder's has not expired."""
    expires_at = now + timedelta(seconds=seconds)
    with writing(engine) as conn:
        taken = conn.execute(
            update(leases)
            .where(
                leases.c.name == name,
                or_(leases.c.expires_at <= now, leases.c.holder == holder),
            )
            .values(holder=holder, expires_at=expires_at)
        ).rowcount
    if taken:
        return True
    try:
        with writing(engine) as conn:
            conn.execute(insert(leases).values(name=name, holder=holder, expires_at=expires_at))
    except IntegrityError:
        return False  # another holder has it (or took it first)
    return True


def renew_lease(engine: Engine, name: str, holder: str, now: datetime, seconds: float) -> bool:
    """Extend this holder's lease for `seconds` from now; False if another holder has it."""
    # Only the holder's own row: a lease another holder took, even one since released, was lost
    # (the two may have worked at once), and is not taken back by a renewal.
    with writing(engine) as conn:
        return bool(
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.holder == holder)
                .values(expires_at=now + timedelta(seconds=seconds))
            ).rowcount
        )


def release_lease(engine: Engine, name: str, holder: str, now: datetime) -> None:
    """Give the lease up at once, if this holder has it."""
    with writing(engine) as conn:
        conn.execute(
            update(leases)
            .where(leases.c.name == name, leases.c.holder == holder)
            .values(expires_at=now)
        )


def probe_write(engine: Engine, holder: str, now: datetime) -> None:
    """Write one row, to learn whether the database takes writes (not only reads).

    It fails within one lock wait (SQLite's busy timeout, PostgreSQL's lock timeout) when the
    database refuses writes: locked by another connection, read-only, gone.
    """
    try:
        _probe_write(engine, holder, now)
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        # Once more, on a new session: a pooled one that was lost, or that went read-only
        # before a failover, says nothing of the server the pool reaches now.
        _probe_write(engine, holder, now)


def _probe_write(engine: Engine, holder: str, now: datetime) -> None:
    # Not in the writers' queue (`writing`): behind a lock held elsewhere, each batch queued in
    # this process would wait its own busy timeout first, and the probe as long as all of them.
    with engine.begin() as conn:
        # The table every submit writes ahead to, first: PostgreSQL locks tables one by one,
        # and another session's LOCK TABLE on this one stops submits, not the lease's write.
        # An UPDATE of no row takes the lock the write-ahead's INSERT takes, and a read-only
        # server refuses it as it refuses the INSERT.
        conn.execute(
            update(submissions).where(submissions.c.id == 0).values(state=submissions.c.state)
        )
        # And one row written: a lease nobody waits for, the readiness probe's.
        dialect = sqlite if engine.dialect.name == "sqlite" else postgresql
        conn.execute(
            dialect.insert(leases)
            .values(name="readiness", holder=holder, expires_at=now)
            .on_conflict_do_update(
                index_elements=[leases.c.name], set_={"holder": holder, "expires_at": now}
            )
        )
