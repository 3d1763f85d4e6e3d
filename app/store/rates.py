"""Rate limits that hold across workers and instances: calls counted per key and second."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy.dialects import postgresql, sqlite

from app.store.engine import writing
from app.store.tables import call_counts


def _upsert(dialect: str) -> Any:
    module = sqlite if dialect == "sqlite" else postgresql
    return module.insert(call_counts)


def _second(moment: datetime) -> int:
    """Return the epoch second of a naive UTC time (the store's clock)."""
    return int(moment.replace(tzinfo=UTC).timestamp())


def take_call(engine: Engine, key_id: int, scope: str, now: datetime, per_second: int) -> bool:
    """Count one call of the key in this second; False (nothing counted) when it is full."""
    second = _second(now)
    statement = _upsert(engine.dialect.name).values(
        key_id=key_id, scope=scope, second=second, calls=1
    )
    # One conditional statement: concurrent callers can never together pass the limit.
    statement = statement.on_conflict_do_update(
        index_elements=[call_counts.c.key_id, call_counts.c.scope, call_counts.c.second],
        set_={"calls": call_counts.c.calls + 1},
        where=call_counts.c.calls < per_second,
    ).returning(call_counts.c.calls)
    with writing(engine) as conn:
        return conn.execute(statement).first() is not None


def forget_call_counts(engine: Engine, before: datetime) -> int:
    """Delete the counts of seconds before a time; return how many went."""
    with writing(engine) as conn:
        return conn.execute(
            delete(call_counts).where(call_counts.c.second < _second(before))
        ).rowcount
