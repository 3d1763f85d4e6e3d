"""Leases: which one process, of every worker and instance, does a job for a while."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, insert, or_, update
from sqlalchemy.exc import IntegrityError

from app.store.engine import writing
from app.store.tables import leases


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


def release_lease(engine: Engine, name: str, holder: str, now: datetime) -> None:
    """Give the lease up at once, if this holder has it."""
    with writing(engine) as conn:
        conn.execute(
            update(leases)
            .where(leases.c.name == name, leases.c.holder == holder)
            .values(expires_at=now)
        )


def probe_write(engine: Engine, holder: str, now: datetime) -> None:
    """Write one row, to learn whether the database takes writes (not only reads)."""
    # A lease nobody waits for: the row of the readiness probe.
    release_lease(engine, "readiness", holder, now)
    acquire_lease(engine, "readiness", holder, now, 0)
