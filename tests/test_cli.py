"""The operator CLI: keys create, list and revoke; db current and upgrade."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import inspect, text

from app.cli import cli
from app.store.schema import HEAD_REVISION
from app.store.tables import metadata
from tests.conftest import BASE_CONFIG, INTL_UPSTREAM_KEY, PRIMARY_UPSTREAM_KEY, bearer
from tests.fixtures import schema_8773b53 as old
from tests.fixtures.old_database import ALICE_SECRET, BOB_SECRET, create_8773b53_database


def test_keys_create_prints_a_working_key_on_the_last_line(app: Flask, client: FlaskClient) -> None:
    result = app.test_cli_runner().invoke(args=["keys", "create", "acme"])

    key = result.output.strip().splitlines()[-1]
    assert result.exit_code == 0
    assert key.startswith("sk-")
    assert client.get("/alibailian/api/v1/tasks/x", headers=bearer(key)).json["code"] == (
        "task_not_exist"
    )


def test_keys_list_never_shows_secrets(app: Flask) -> None:
    runner = app.test_cli_runner()
    key = runner.invoke(args=["keys", "create", "acme", "--models", "b,a"]).output.split()[-1]

    listing = runner.invoke(args=["keys", "list"]).output

    assert key not in listing
    assert key[-4:] in listing
    assert "acme" in listing
    assert "a,b" in listing


def test_keys_revoke_by_secret_and_by_id(app: Flask, client: FlaskClient) -> None:
    runner = app.test_cli_runner()
    first = runner.invoke(args=["keys", "create", "acme"]).output.split()[-1]
    second = runner.invoke(args=["keys", "create", "acme"]).output.split()[-1]

    by_secret = runner.invoke(args=["keys", "revoke", first])
    by_id = runner.invoke(args=["keys", "revoke", "2"])
    again = runner.invoke(args=["keys", "revoke", first])

    assert (by_secret.exit_code, by_id.exit_code, again.exit_code) == (0, 0, 1)
    for key in (first, second):
        response = client.get("/alibailian/api/v1/tasks/x", headers=bearer(key))
        assert response.json["message"] == "Invalid API-key provided."
    assert runner.invoke(args=["keys", "list"]).output.count("revoked") == 2


@pytest.fixture
def console_app(
    database_url: str, write_config: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    """Return the app the `bailian-gateway` console script makes, over the test database."""
    monkeypatch.setenv("GATEWAY_CONFIG", write_config(BASE_CONFIG))
    monkeypatch.setenv("GATEWAY_DATABASE_URL", database_url)
    monkeypatch.setenv("PRIMARY_UPSTREAM_KEY", PRIMARY_UPSTREAM_KEY)
    monkeypatch.setenv("INTL_UPSTREAM_KEY", INTL_UPSTREAM_KEY)
    app = cli.create_app()
    yield app
    app.extensions["gateway"].engine.dispose()


def test_the_console_scripts_app_changes_no_schema_until_a_command_does(
    console_app: Flask,
) -> None:
    engine = console_app.extensions["gateway"].engine
    runner = console_app.test_cli_runner()

    assert runner.invoke(args=["db", "current"]).output == "none (empty database)\n"
    assert inspect(engine).get_table_names() == []
    # The keys commands work on the schema the server would, so they migrate first.
    assert runner.invoke(args=["keys", "list"]).exit_code == 0
    assert runner.invoke(args=["db", "current"]).output == f"{HEAD_REVISION} (head)\n"


def test_db_upgrade_of_a_database_made_before_migrations(
    database_url: str, console_app: Flask
) -> None:
    create_8773b53_database(database_url)
    runner = console_app.test_cli_runner()

    current = runner.invoke(args=["db", "current"])
    upgrade = runner.invoke(args=["db", "upgrade"])
    again = runner.invoke(args=["db", "upgrade"])

    assert current.output == "none (tables made before migrations: taken as 0001)\n"
    assert (upgrade.exit_code, again.exit_code) == (0, 0)
    assert upgrade.output == (
        "before: none (tables made before migrations: taken as 0001)\n"
        f"after: {HEAD_REVISION} (head)\n"
    )
    assert again.output == f"before: {HEAD_REVISION} (head)\nafter: {HEAD_REVISION} (head)\n"
    listing = runner.invoke(args=["keys", "list"]).output
    assert ALICE_SECRET[-4:] in listing
    assert BOB_SECRET[-4:] in listing


def test_db_upgrade_of_an_empty_database(console_app: Flask) -> None:
    result = console_app.test_cli_runner().invoke(args=["db", "upgrade"])

    assert result.exit_code == 0
    assert result.output == f"before: none (empty database)\nafter: {HEAD_REVISION} (head)\n"


def test_db_upgrade_refuses_a_database_newer_than_this_release(console_app: Flask) -> None:
    runner = console_app.test_cli_runner()
    runner.invoke(args=["db", "upgrade"])
    with console_app.extensions["gateway"].engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    result = runner.invoke(args=["db", "upgrade"])

    assert result.exit_code == 1
    assert "before: 9999\nafter: 9999\n" in result.output
    assert "does not know" in result.output
    assert runner.invoke(args=["db", "current"]).output == "9999\n"


def test_db_upgrade_refuses_tables_newer_than_the_baseline_without_a_revision(
    database_url: str, console_app: Flask
) -> None:
    engine = console_app.extensions["gateway"].engine
    old.metadata.create_all(engine)
    metadata.tables["leases"].create(engine)

    result = console_app.test_cli_runner().invoke(args=["db", "upgrade"])

    assert result.exit_code == 1
    assert "leases" in result.output
    assert "alembic stamp" in result.output
