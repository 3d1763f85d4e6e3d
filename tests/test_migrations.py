"""The schema's migrations: what they build, what they keep, and what a start costs at head."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    Engine,
    MetaData,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    select,
    text,
)

from app.store import (
    Caller,
    create_key,
    find_caller,
    hash_secret,
    list_keys,
    list_owned_tasks,
    open_engine,
    record_task,
)
from app.store.schema import (
    BASELINE_REVISION,
    BASELINE_TABLES,
    HEAD_REVISION,
    MIGRATIONS_DIR,
    SchemaError,
    alembic_config,
    read_revision,
)
from app.store.tables import metadata, submissions, task_counts, tasks
from app.store.time import utcnow
from tests.fixtures import schema_8773b53 as old
from tests.fixtures.old_database import (
    ALICE_SECRET,
    BOB_SECRET,
    REVOKED_SECRET,
    create_8773b53_database,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _reference_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """Return a second empty database on the same backend, to build a schema to compare with."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'reference.sqlite3'}"
        return
    # A schema of its own in the test database, as tests/e2e/conftest.py makes one.
    schema = f"reference_{os.getpid()}_{secrets.token_hex(4)}"
    with _engine(database_url) as admin:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"})
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def _schema_of(engine: Engine) -> dict[str, Any]:
    """Return what the database says of each table: columns, keys, constraints and indexes."""
    # compare_metadata leaves out column defaults (PostgreSQL's serial ids) and the WHERE of
    # partial indexes: this compares them too, between databases made on the same backend.
    found = inspect(engine)
    schema: dict[str, Any] = {}
    for table in sorted(set(found.get_table_names()) - {"alembic_version"}):
        schema[table] = {
            "columns": [
                (col["name"], str(col["type"]), col["nullable"], col.get("default"))
                for col in found.get_columns(table)
            ],
            "primary_key": found.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                )
                for fk in found.get_foreign_keys(table)
            ),
            "unique": sorted(
                (str(uc["name"]), tuple(uc["column_names"]))
                for uc in found.get_unique_constraints(table)
            ),
            "indexes": sorted(
                (
                    str(ix["name"]),
                    tuple(str(name) for name in ix["column_names"]),
                    ix["unique"],
                    sorted(
                        (key, str(value)) for key, value in ix.get("dialect_options", {}).items()
                    ),
                )
                for ix in found.get_indexes(table)
            ),
        }
    return schema


def _differences(engine: Engine, target: MetaData) -> list[Any]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), target))


def _alembic(engine: Engine, action: str, revision: str) -> None:
    """Run `alembic upgrade|downgrade REVISION` on the database, in one transaction."""
    with engine.begin() as conn:
        getattr(command, action)(alembic_config(conn), revision)


def _record(engine: Engine, task_id: str, caller: Caller) -> None:
    record_task(
        engine,
        task_id=task_id,
        account_id=caller.account_id,
        key_id=caller.key_id,
        channel="primary",
        model="wan2.5-t2v-preview",
        status="PENDING",
        upstream_body="{}",
        now=utcnow(),
    )


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return read_revision(conn).id


def test_head_revision_is_the_newest_migration_and_history_is_one_line() -> None:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    chain = [rev.revision for rev in script.walk_revisions()]

    assert script.get_heads() == [HEAD_REVISION]
    assert chain[-1] == BASELINE_REVISION
    assert chain == sorted(chain, reverse=True)
    for rev in script.walk_revisions():
        assert rev.module.downgrade.__doc__, f"{rev.revision} has no documented downgrade"


def test_migrations_build_exactly_the_tables_module(database_url: str, tmp_path: Path) -> None:
    engine = open_engine(database_url)
    try:
        assert _revision(engine) == HEAD_REVISION
        # A change to app/store/tables.py without a migration fails here.
        assert _differences(engine, metadata) == []
        with (
            _reference_database(database_url, tmp_path) as reference_url,
            _engine(reference_url) as reference,
        ):
            metadata.create_all(reference)
            assert _schema_of(engine) == _schema_of(reference)
    finally:
        engine.dispose()


def test_baseline_is_the_schema_of_8773b53(database_url: str, tmp_path: Path) -> None:
    with _engine(database_url) as engine:
        _alembic(engine, "upgrade", BASELINE_REVISION)

        assert _differences(engine, old.metadata) == []
        with (
            _reference_database(database_url, tmp_path) as reference_url,
            _engine(reference_url) as reference,
        ):
            old.metadata.create_all(reference)
            assert _schema_of(engine) == _schema_of(reference)


def test_a_database_made_before_migrations_keeps_every_row(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = create_8773b53_database(database_url)
    caplog.set_level(logging.INFO)

    engine = open_engine(database_url)
    try:
        assert before.still_there(engine)
        assert _revision(engine) == HEAD_REVISION
        assert _differences(engine, metadata) == []
        assert {"submissions", "leases", "task_archive"} <= set(inspect(engine).get_table_names())
        # The old keys still authenticate (the revoked one still does not) ...
        alice = find_caller(engine, hash_secret(ALICE_SECRET))
        bob = find_caller(engine, hash_secret(BOB_SECRET))
        assert alice is not None
        assert (alice.account_name, alice.models) == ("acme", None)
        assert bob is not None
        assert bob.models == frozenset({"wan2.2-t2v-plus", "wan2.5-t2v-preview"})
        assert find_caller(engine, hash_secret(REVOKED_SECRET)) is None
        # ... and new keys and tasks are written beside the old ones.
        secret = create_key(engine, "acme")
        caller = find_caller(engine, hash_secret(secret))
        assert caller is not None
        assert caller.account_id == alice.account_id
        _record(engine, "task-after-upgrade", caller)
        with engine.connect() as conn:
            owned = conn.execute(select(tasks.c.task_id).where(tasks.c.account_id == 1)).all()
        assert len(owned) == 2
        assert [key.key_id for key in list_keys(engine)] == [1, 2, 3, 4]
    finally:
        engine.dispose()
    # Alembic said what it ran, and nothing of the rows; SQLAlchemy's statement log stayed off.
    messages = [record.getMessage() for record in caplog.records]
    assert any("Running stamp_revision  -> 0001" in message for message in messages)
    assert any("Running upgrade 0001 -> 0002" in message for message in messages)
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
    logged = "\n".join(messages)
    for value in ("acme", "globex", hash_secret(ALICE_SECRET), ALICE_SECRET[-4:], "RUNNING"):
        assert value not in logged


def test_downgrade_to_the_baseline_and_back(database_url: str) -> None:
    engine = open_engine(database_url)
    try:
        secret = create_key(engine, "acme")
        caller = find_caller(engine, hash_secret(secret))
        assert caller is not None
        _record(engine, "task-1", caller)

        _alembic(engine, "downgrade", BASELINE_REVISION)
        assert _revision(engine) == BASELINE_REVISION
        assert _differences(engine, old.metadata) == []
        assert set(inspect(engine).get_table_names()) == {*BASELINE_TABLES, "alembic_version"}

        _alembic(engine, "upgrade", "head")
        assert _revision(engine) == HEAD_REVISION
        assert _differences(engine, metadata) == []
        # The baseline's tables kept their rows through both.
        assert find_caller(engine, hash_secret(secret)) == caller
        with engine.connect() as conn:
            assert conn.execute(select(tasks.c.task_id)).scalars().all() == ["task-1"]

        with engine.begin() as conn:
            conn.execute(tasks.delete())
        _alembic(engine, "downgrade", "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert _revision(engine) is None
    finally:
        engine.dispose()


def test_a_database_newer_than_this_release_is_served_as_it_is(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    open_engine(database_url).dispose()
    with _engine(database_url) as engine, engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    engine = open_engine(database_url)
    try:
        assert _revision(engine) == "9999"
        assert create_key(engine, "acme").startswith("sk-")
    finally:
        engine.dispose()
    assert any("9999 is unknown to this release" in r.getMessage() for r in caplog.records)


def test_a_database_between_baseline_and_migrations_is_refused(database_url: str) -> None:
    # Made by code that had the later tables but no migrations: which revision it matches
    # is for an operator to say, not for a guess.
    with _engine(database_url) as engine:
        old.metadata.create_all(engine)
        metadata.tables["leases"].create(engine)

    with pytest.raises(SchemaError, match="leases"):
        open_engine(database_url)

    with _engine(database_url) as engine:
        assert "alembic_version" not in inspect(engine).get_table_names()


def test_a_start_at_head_takes_no_lock_and_runs_no_alembic(database_url: str) -> None:
    open_engine(database_url).dispose()
    statements: list[str] = []

    def remember(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", remember)
    try:
        open_engine(database_url).dispose()
    finally:
        event.remove(Engine, "before_cursor_execute", remember)

    assert any("alembic_version" in statement for statement in statements)
    assert not [s for s in statements if "IMMEDIATE" in s or "advisory" in s or "CREATE" in s]
    # In a fresh interpreter, as a gunicorn worker starts: Alembic is not even imported.
    probe = (
        "import sys; from app.store import open_engine; "
        f"open_engine({database_url!r}).dispose(); print('alembic' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "False"


def test_0006_counts_the_tasks_already_there_and_its_downgrade_keeps_them(
    database_url: str,
) -> None:
    with _engine(database_url) as engine:
        _alembic(engine, "upgrade", "0005")
    engine = open_engine(database_url, upgrade=False)
    try:
        secret = create_key(engine, "acme")
        caller = find_caller(engine, hash_secret(secret))
        assert caller is not None
        for n in range(5):
            _record(engine, f"task-{n}", caller)
        with engine.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.task_id == "task-0").values(status="FAILED"))

        _alembic(engine, "upgrade", "0006")
        with engine.connect() as conn:
            counts = conn.execute(
                select(task_counts.c.status, func.sum(task_counts.c.n)).group_by(
                    task_counts.c.status
                )
            ).all()
        assert sorted(counts) == [("FAILED", 1), ("PENDING", 4)]
        # From here the triggers count: a new task, a status change.
        _record(engine, "task-5", caller)
        with engine.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.task_id == "task-1").values(status="FAILED"))
        total, _ = list_owned_tasks(
            engine, caller.account_id, submitted_after=datetime.min, status="FAILED"
        )
        assert total == 2

        _alembic(engine, "downgrade", "0005")
        assert "task_counts" not in inspect(engine).get_table_names()
        indexes = {ix["name"]: ix["column_names"] for ix in inspect(engine).get_indexes("tasks")}
        assert indexes["ix_tasks_account_model_submitted"] == [
            "account_id",
            "model",
            "status",
            "submitted_at",
        ]
        assert "ix_tasks_account_model_status_submitted" not in indexes
        _record(engine, "task-6", caller)  # no trigger is left to write to a missing table
        with engine.begin() as conn:
            conn.execute(tasks.delete().where(tasks.c.task_id == "task-6"))
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 6

        _alembic(engine, "upgrade", "head")
        assert _differences(engine, metadata) == []
        total, _ = list_owned_tasks(engine, caller.account_id, submitted_after=datetime.min)
        assert total == 6
    finally:
        engine.dispose()


def test_0007_keeps_the_submissions_in_flight_and_its_downgrade_keeps_them(
    database_url: str,
) -> None:
    with _engine(database_url) as engine:
        _alembic(engine, "upgrade", "0006")
    engine = open_engine(database_url, upgrade=False)
    try:
        caller = find_caller(engine, hash_secret(create_key(engine, "acme")))
        assert caller is not None
        row = {
            "account_id": caller.account_id,
            "key_id": caller.key_id,
            "model": "wan2.5-t2v-preview",
            "channel": "primary",
            "service_path": "services/aigc/video-generation/video-synthesis",
            "body_sha256": "0" * 64,
            "state": "in_flight",
            "sent_at": utcnow(),
        }
        with engine.begin() as conn:
            conn.execute(submissions.insert().values(**row))

        _alembic(engine, "upgrade", "0007")
        with engine.connect() as conn:
            kept = conn.execute(select(submissions.c.state, submissions.c.prompt_sha256)).all()
        assert [tuple(found) for found in kept] == [("in_flight", None)]  # told apart as before

        _alembic(engine, "downgrade", "0006")
        columns = {column["name"] for column in inspect(engine).get_columns("submissions")}
        assert "prompt_sha256" not in columns
        with engine.connect() as conn:
            assert conn.execute(select(submissions.c.state)).scalars().all() == ["in_flight"]
    finally:
        engine.dispose()


def test_0008_takes_the_byte_order_mark_off_answers_stored_with_one(database_url: str) -> None:
    with _engine(database_url) as engine:
        _alembic(engine, "upgrade", "0007")
    engine = open_engine(database_url, upgrade=False)
    try:
        caller = find_caller(engine, hash_secret(create_key(engine, "acme")))
        assert caller is not None
        answer = '{"output": {"task_id": "t", "task_status": "RUNNING"}}'
        for task_id in ("with-bom", "without"):
            _record(engine, task_id, caller)
        with engine.begin() as conn:
            for task_id, body in (("with-bom", "\ufeff" + answer), ("without", answer)):
                conn.execute(
                    tasks.update().where(tasks.c.task_id == task_id).values(upstream_body=body)
                )

        _alembic(engine, "upgrade", "0008")

        with engine.connect() as conn:
            bodies = dict(conn.execute(select(tasks.c.task_id, tasks.c.upstream_body)).all())
        assert bodies == {"with-bom": answer, "without": answer}
        assert json.loads(bodies["with-bom"])["output"]["task_status"] == "RUNNING"
        _alembic(engine, "downgrade", "0007")
        assert _revision(engine) == "0007"
    finally:
        engine.dispose()
