"""A DirectRead answers what SQLAlchemy's own execution answers, and always frees its connection."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    select,
    text,
)

from app.store import create_key, open_engine, record_task
from app.store.engine import DirectRead
from app.store.tables import tasks

SUBMITTED = datetime(2026, 11, 25, 4, 30, 15, 123456)

BY_ID_AND_AGE = select(tasks).where(
    tasks.c.task_id == bindparam("task_id"), tasks.c.submitted_at > bindparam("after")
)

# A table the database does not have, for a query that fails in the driver.
NOT_CREATED = Table("no_such_table", MetaData(), Column("id", Integer))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    # One connection, so a read that kept it (or left it mid-transaction) stalls the next one.
    engine = open_engine(database_url, pool_size=1, max_overflow=0)
    create_key(engine, "acme")
    yield engine
    engine.dispose()


def add_task(engine: Engine, status: str, submitted: datetime = SUBMITTED) -> None:
    record_task(
        engine,
        task_id="task-1",
        account_id=1,
        key_id=1,
        channel="main",
        model="wan2.2-t2v-plus",
        status=status,
        upstream_body='{"output": {"task_status": "RUNNING"}, "note": "ü"}',
        now=submitted,
    )


# A final task is stored with its finish time (to the microsecond), a running one with NULL.
@pytest.mark.parametrize(("status", "finished_at"), [("RUNNING", None), ("SUCCEEDED", SUBMITTED)])
def test_a_row_comes_back_as_a_connection_returns_it(
    engine: Engine, status: str, finished_at: datetime | None
) -> None:
    add_task(engine, status)
    params = {"task_id": "task-1", "after": SUBMITTED - timedelta(microseconds=1)}
    with engine.connect() as conn:
        expected = tuple(conn.execute(BY_ID_AND_AGE, params).one())

    row = DirectRead(BY_ID_AND_AGE).first(engine, params)

    assert row == expected
    assert row is not None
    assert row[7] == SUBMITTED  # a datetime, to the microsecond, not the driver's text
    assert row[9] == finished_at


def test_parameters_are_converted_before_they_are_compared(engine: Engine) -> None:
    # On a whole second: SQLite's own datetime text drops the zero microseconds that the
    # stored text has, and would compare as earlier.
    submitted = SUBMITTED.replace(microsecond=0)
    add_task(engine, "RUNNING", submitted)
    read = DirectRead(BY_ID_AND_AGE)

    assert read.first(engine, {"task_id": "task-1", "after": submitted}) is None
    assert read.first(engine, {"task_id": "other", "after": datetime(2000, 1, 1)}) is None
    found = read.first(engine, {"task_id": "task-1", "after": submitted - timedelta(seconds=1)})
    assert found is not None
    assert found[0] == "task-1"


def test_the_connection_goes_back_to_the_pool_even_when_the_query_fails(engine: Engine) -> None:
    add_task(engine, "RUNNING")
    params = {"task_id": "task-1", "after": datetime(2000, 1, 1)}

    with pytest.raises(Exception, match="no_such_table"):
        DirectRead(select(NOT_CREATED)).first(engine, {})

    assert engine.pool.checkedout() == 0
    # The pool's only connection, rolled back: on PostgreSQL a failed statement would otherwise
    # leave its transaction unusable.
    assert DirectRead(BY_ID_AND_AGE).first(engine, params) is not None
    assert engine.pool.checkedout() == 0


def test_a_connection_the_server_dropped_is_replaced_before_the_read(
    engine: Engine, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("a server that drops connections: PostgreSQL only")
    add_task(engine, "RUNNING")
    read = DirectRead(BY_ID_AND_AGE)
    params = {"task_id": "task-1", "after": datetime(2000, 1, 1)}
    assert read.first(engine, params) is not None
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    # As a server restart or an idle timeout would: the pool still holds the connection.
    killer = create_engine(database_url)
    with killer.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    killer.dispose()

    assert read.first(engine, params) is not None
