"""The operator CLI: keys create, list and revoke."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import bearer


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
