"""The operator CLI: keys create, list and revoke; db current and upgrade; config check."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import inspect, text

from app.cli import cli
from app.config import ConfigError, load_settings
from app.store.schema import HEAD_REVISION
from app.store.tables import metadata
from tests.conftest import BASE_CONFIG, INTL_UPSTREAM_KEY, PRIMARY_UPSTREAM_KEY, bearer
from tests.fixtures import schema_8773b53 as old
from tests.fixtures.old_database import ALICE_SECRET, BOB_SECRET, create_8773b53_database

CHANNEL_KEYS = {
    "PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY,
    "INTL_UPSTREAM_KEY": INTL_UPSTREAM_KEY,
}


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


# --------------------------------------------------------------------------- accounts, usage


def clean_exit(result: Result) -> int:
    """Return a command's exit status, failing on any exception but the exit itself."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result.exit_code


@pytest.mark.parametrize(
    "args",
    [
        ["accounts", "limit", "acme", "1e20"],
        ["accounts", "limit", "acme", "1e30"],  # more digits than a Decimal rounds
        ["accounts", "limit", "acme", "1000000000000", "--per", "total"],
        ["accounts", "limit", "acme", "999999999999.9999996"],  # would round up past it
        ["accounts", "adjust", "acme", "1e20", "--reason", "r"],
        ["accounts", "adjust", "acme", "-1e20", "--reason", "r"],
    ],
)
def test_an_amount_past_what_the_ledger_holds_is_a_usage_error(
    app: Flask, api_key: str, args: list[str]
) -> None:
    result = app.test_cli_runner().invoke(args=args)

    assert clean_exit(result) == 2
    assert "is more than the ledger holds: at most 999999999999.999999" in result.output
    shown = app.test_cli_runner().invoke(args=["accounts", "show", "acme"]).output
    assert "limit:     none" in shown
    assert "spent:     0.00 CNY" in shown


def test_the_largest_amount_works_and_a_balance_past_it_is_refused_whole(
    app: Flask, api_key: str
) -> None:
    runner = app.test_cli_runner()

    limit = runner.invoke(args=["accounts", "limit", "acme", "999999999999.999999"])
    first = runner.invoke(args=["accounts", "adjust", "acme", "-999999999999", "--reason", "a"])
    second = runner.invoke(args=["accounts", "adjust", "acme", "-999999999999", "--reason", "b"])

    assert (clean_exit(limit), clean_exit(first), clean_exit(second)) == (0, 0, 1)
    assert "would pass 999999999999.999999" in second.output
    assert "nothing was written" in second.output
    shown = runner.invoke(args=["accounts", "show", "acme"]).output
    assert "spent:     999999999999.00 CNY" in shown
    usage = runner.invoke(args=["usage", "--format", "csv"]).output
    assert usage.splitlines()[1:] == ["adjustment,0,0,999999999999.000000,CNY"]


@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (["accounts", "show", "acme"], 1, "no account named 'acme'"),
        (["accounts", "limit", "acme", "5"], 1, "no account named 'acme'"),
        (["accounts", "adjust", "acme", "5", "--reason", "r"], 1, "no account named 'acme'"),
        (["usage"], 0, "kind  tasks  seconds  amount  currency"),
        (["usage", "--format", "json"], 0, "[]"),
    ],
)
def test_accounts_and_usage_migrate_a_database_first_as_keys_does(
    console_app: Flask, args: list[str], status: int, said: str
) -> None:
    runner = console_app.test_cli_runner()

    result = runner.invoke(args=args)

    assert clean_exit(result) == status
    assert said in result.output
    assert runner.invoke(args=["db", "current"]).output == f"{HEAD_REVISION} (head)\n"


# --------------------------------------------------------------------------- config check


def config_check(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """Run the real `bailian-gateway config check ARGS` with only these variables set."""
    # A database nobody listens on: the check must not try to open it.
    env = {
        "PATH": os.environ["PATH"],
        "GATEWAY_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
        **environ,
    }
    return subprocess.run(
        [str(Path(sys.executable).parent / "bailian-gateway"), "config", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_check_prints_the_channels_and_the_offered_models(
    write_config: Callable[[str], str],
) -> None:
    path = write_config(BASE_CONFIG)

    done = config_check(GATEWAY_CONFIG=path, **CHANNEL_KEYS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {path}\nchannels: 2\n")
    assert "models offered: 3: wan2.2-t2v-plus, wan2.5-t2v-preview, wanx2.1-kf2v-plus" in (
        done.stdout
    )
    assert PRIMARY_UPSTREAM_KEY not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        pytest.param("[upstream\nread_timeout = 3\n", CHANNEL_KEYS, id="toml-typo"),
        pytest.param(BASE_CONFIG, {"PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY}, id="key-unset"),
        pytest.param("[server]\nmax_body_bytes = '1'\n", {}, id="wrong-type"),
    ],
)
def test_config_check_fails_with_the_services_own_message(
    write_config: Callable[[str], str], text: str, environ: dict[str, str]
) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as refused:  # what the service stops with at start-up
        load_settings({"GATEWAY_CONFIG": path, **environ})

    done = config_check(GATEWAY_CONFIG=path, **environ)

    assert done.returncode == 1
    assert done.stderr.strip() == str(refused.value)
    assert done.stderr.startswith(f"{path}: ")
    assert done.stdout == ""


def test_config_check_file_option_wins_over_the_environment(
    write_config: Callable[[str], str], tmp_path: Path
) -> None:
    good = write_config(BASE_CONFIG)

    done = config_check("--file", good, GATEWAY_CONFIG=str(tmp_path / "gone.toml"), **CHANNEL_KEYS)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"OK: {good}\n")
