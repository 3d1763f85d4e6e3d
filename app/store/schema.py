"""Bring the database's schema to this release's revision with Alembic, one process at a time."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from app.store.tables import metadata

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

# The newest migration in migrations/versions (a test keeps the two in step). Known without
# Alembic, so a worker starting on an up-to-date database neither imports nor runs it.
HEAD_REVISION = "0008"
# The schema the code before migrations created (commit 8773b53), and its tables.
BASELINE_REVISION = "0001"
BASELINE_TABLES = frozenset({"accounts", "api_keys", "tasks"})

# Next to the app package: the source tree in an editable install, site-packages otherwise
# (setup.cfg ships migrations/ as a package). Found by path rather than imported, so that a
# `migrations` module elsewhere on sys.path cannot stand in for it.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

# The key of the PostgreSQL advisory lock that schema changes hold ("bailian" in ASCII).
_SCHEMA_LOCK_KEY = 0x6261696C69616E


class SchemaError(RuntimeError):
    """The database's schema is one no migration can start from."""


@dataclass(frozen=True)
class Revision:
    """Where a database's schema stands."""

    # The row of alembic_version; None when there is none.
    id: str | None
    # No alembic_version, but the tables the code before migrations created: taken as 0001.
    pre_migrations: bool = False

    def describe(self) -> str:
        """Return the revision as `db current` prints it."""
        if self.id == HEAD_REVISION:
            return f"{self.id} (head)"
        if self.id is not None:
            return self.id
        if self.pre_migrations:
            return f"none (tables made before migrations: taken as {BASELINE_REVISION})"
        return "none (empty database)"


@dataclass(frozen=True)
class SchemaUpgrade:
    """The revisions of a database before and after an upgrade."""

    before: Revision
    after: Revision

    @property
    def at_head(self) -> bool:
        """Return whether the schema is now this release's."""
        return self.after.id == HEAD_REVISION


def read_revision(conn: Connection) -> Revision:
    """Return the database's revision, without changing anything."""
    found = inspect(conn)
    if found.has_table("alembic_version"):
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(versions) == 1:
            return Revision(versions[0])
        if versions:
            raise SchemaError(f"alembic_version holds several revisions: {sorted(versions)}")
    return Revision(None, pre_migrations=any(found.has_table(name) for name in BASELINE_TABLES))


def upgrade_schema(engine: Engine) -> SchemaUpgrade:
    """Migrate the database to the head revision under a database-wide lock."""
    # Every gunicorn worker and instance runs this as it starts. Once the database is at head,
    # that is one connection and two small queries, without the lock and without Alembic.
    with engine.connect() as conn:
        before = read_revision(conn)
    if before.id == HEAD_REVISION:
        return SchemaUpgrade(before, before)
    # Two workers on an empty database would both find it empty and the second CREATE would
    # fail: its worker would not boot and gunicorn would stop the whole server. The check and
    # the migration therefore run in one transaction that holds the lock until it commits.
    with _schema_lock(engine) as conn:
        # Read again: another process may have migrated while this one waited for the lock.
        before = read_revision(conn)
        if before.id != HEAD_REVISION:
            _migrate(conn, before)
        return SchemaUpgrade(before, read_revision(conn))


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    """Open a transaction that no other process's schema change runs beside."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            # The write lock, taken now rather than at the first CREATE; busy_timeout queues
            # the other workers behind it.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        yield conn


def _migrate(conn: Connection, before: Revision) -> None:
    """Run Alembic's upgrade to head on the locked connection."""
    # Imported here: only a start that has a migration to run pays for Alembic. Its `context`
    # and `op` are module globals; the lock also keeps two threads of a process out of them.
    from alembic import command
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    config = alembic_config(conn)
    if before.id is not None:
        try:
            ScriptDirectory.from_config(config).get_revision(before.id)
        except CommandError:
            # A newer release migrated the database (a rolling deploy, or a rollback of the
            # code): its migrations keep the release before it working, so serve on it.
            log.warning(
                "the database's schema revision %s is unknown to this release (head %s): "
                "a newer release migrated it; leaving the schema as it is",
                before.id,
                HEAD_REVISION,
            )
            return
    elif before.pre_migrations:
        _check_pre_migration_tables(conn)
        command.stamp(config, BASELINE_REVISION)
    command.upgrade(config, "head")


def _check_pre_migration_tables(conn: Connection) -> None:
    """Refuse a database without alembic_version that holds more than the baseline's tables."""
    # Stamping such a database 0001 would make 0002 fail on a table that exists, or hide a
    # missing index: an operator has to tell Alembic which revision it matches.
    found = inspect(conn)
    later = sorted(name for name in metadata.tables if name not in BASELINE_TABLES)
    present = [name for name in later if found.has_table(name)]
    if present:
        raise SchemaError(
            f"the database has no alembic_version but has tables newer than the schema "
            f"before migrations ({', '.join(present)}): find the revision it matches and "
            f"record it with `alembic stamp REVISION` (docs/operations.md)"
        )


def alembic_config(conn: Connection) -> Config:
    """Return an Alembic configuration that runs migrations/ on the given connection."""
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise SchemaError(f"the migrations are missing: no env.py in {MIGRATIONS_DIR}")
    config = Config()
    # The option goes through configparser's interpolation, where % is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    # migrations/env.py runs on this connection, in its transaction, instead of opening one.
    config.attributes["connection"] = conn
    return config
