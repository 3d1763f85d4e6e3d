"""Run the migrations on the gateway's own connection, or on GATEWAY_DATABASE_URL."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from app.store.tables import metadata

config = context.config


def run_on(connection: Connection) -> None:
    """Run the migrations on a connection, in its transaction if it has one."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite alters a table by copying it: autogenerate writes such changes as batch
        # operations, which work on PostgreSQL too.
        render_as_batch=True,
    )
    # The gateway hands over a connection inside its locked transaction: Alembic then begins
    # and commits nothing, and the lock is held until the gateway commits.
    with context.begin_transaction():
        context.run_migrations()


def database_url() -> str:
    """Return the URL of developers' `alembic` commands: the one the gateway reads."""
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("GATEWAY_DATABASE_URL")
    if not url:
        raise SystemExit(
            "set GATEWAY_DATABASE_URL to the database (bailian-gateway db upgrade does this itself)"
        )
    return url


shared = config.attributes.get("connection")
if shared is not None:
    # Called by app/store/schema.py, which configured logging and holds the lock.
    run_on(shared)
else:
    # Developers' `alembic` command line: logging as alembic.ini says, the URL from the
    # environment, and no lock (the gateway's `db upgrade` takes one).
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        context.configure(url=database_url(), target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
    else:
        engine = create_engine(database_url(), poolclass=pool.NullPool)
        try:
            with engine.connect() as connection:
                run_on(connection)
        finally:
            engine.dispose()
