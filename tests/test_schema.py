"""The schema is migrated once, however many workers start on a database at once."""

from __future__ import annotations

import threading

from sqlalchemy import Engine, create_engine, inspect

from app.store import open_engine
from app.store.schema import HEAD_REVISION, read_revision
from app.store.tables import metadata
from tests.conftest import wipe
from tests.fixtures.old_database import create_8773b53_database

WORKERS = 8  # twice gunicorn.conf.py's default worker count
# Without the lock a round failed about one time in three: enough rounds to catch it.
ROUNDS = 10


def _start_together(database_url: str) -> tuple[list[Engine], list[BaseException]]:
    """Open the database from WORKERS threads at the same instant, as workers booting."""
    barrier = threading.Barrier(WORKERS)
    engines: list[Engine] = []
    errors: list[BaseException] = []

    def boot() -> None:
        barrier.wait()
        try:
            engines.append(open_engine(database_url, pool_size=1, max_overflow=0))
        except Exception as exc:  # every failure is reported by the test, not only the first
            errors.append(exc)

    threads = [threading.Thread(target=boot) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return engines, errors


def test_workers_starting_together_on_an_empty_database_all_start(database_url: str) -> None:
    wiper = create_engine(database_url)
    try:
        for _ in range(ROUNDS):
            wipe(wiper)
            engines, errors = _start_together(database_url)
            for engine in engines:
                engine.dispose()
            assert errors == []
            assert set(inspect(wiper).get_table_names()) == {*metadata.tables, "alembic_version"}
            with wiper.connect() as conn:
                assert read_revision(conn).id == HEAD_REVISION
    finally:
        wiper.dispose()


def test_workers_starting_together_on_a_database_made_before_migrations_all_start(
    database_url: str,
) -> None:
    wiper = create_engine(database_url)
    try:
        for _ in range(3):
            wipe(wiper)
            before = create_8773b53_database(database_url)
            engines, errors = _start_together(database_url)
            for engine in engines:
                engine.dispose()
            assert errors == []
            # Stamped once and upgraded once: read_revision refuses several version rows.
            with wiper.connect() as conn:
                assert read_revision(conn).id == HEAD_REVISION
            assert before.still_there(wiper)
    finally:
        wiper.dispose()
