"""Liveness and readiness: /healthz touches nothing, /readyz checks the database and channels."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from tests.conftest import (
    BASE_CONFIG,
    INTL_UPSTREAM_KEY,
    PRIMARY,
    PRIMARY_UPSTREAM_KEY,
    SUBMIT_PATH,
    bearer,
)

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_SERVICE = "/api/v1/services/aigc/video-generation/video-synthesis"


@pytest.fixture
def breakable_app(write_config: Callable[[str], str], tmp_path: Path) -> Flask:
    """Return an app over a SQLite file that a test can take away."""
    (tmp_path / "db").mkdir()
    app = create_app(
        {
            "GATEWAY_CONFIG": write_config(BASE_CONFIG),
            "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'gateway.sqlite3'}",
            "PRIMARY_UPSTREAM_KEY": PRIMARY_UPSTREAM_KEY,
            "INTL_UPSTREAM_KEY": INTL_UPSTREAM_KEY,
        }
    )
    app.config["TESTING"] = True
    return app


def take_database_away(app: Flask, tmp_path: Path) -> None:
    """Make the database unreachable: no pooled connection, and a directory at its path."""
    app.extensions["gateway"].engine.dispose()
    shutil.rmtree(tmp_path / "db")
    (tmp_path / "db" / "gateway.sqlite3").mkdir(parents=True)


def test_healthz_answers_ok_without_a_key(client: Flask) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert response.headers["X-Request-Id"]


def test_healthz_touches_neither_database_nor_upstream(
    breakable_app: Flask, tmp_path: Path, upstream: responses.RequestsMock
) -> None:
    # `upstream` fails the test on any outgoing call; the database is gone.
    take_database_away(breakable_app, tmp_path)

    response = breakable_app.test_client().get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_ready_with_database_and_channels(client: Flask) -> None:
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "channels": 2, "failing_channels": []}


def test_readyz_is_503_with_a_reason_when_the_database_is_unreachable(
    breakable_app: Flask, tmp_path: Path
) -> None:
    client = breakable_app.test_client()
    assert client.get("/readyz").status_code == 200
    take_database_away(breakable_app, tmp_path)

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "reason": "database cannot be written: OperationalError",
    }
    assert response.headers["Content-Type"] == "application/json"


def test_readyz_is_503_with_a_reason_when_no_channel_is_configured(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app("[tasks]\nrefresh_interval = 1\n")

    response = app.test_client().get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "no channels configured"}
    app.extensions["gateway"].engine.dispose()


def test_readyz_lists_failing_channels_and_is_503_only_when_every_one_fails(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    accepted = {"request_id": "s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}}
    upstream.post(f"{PRIMARY}{UPSTREAM_SERVICE}", json=accepted)
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    assert client.post(SUBMIT_PATH, json=body, headers=bearer(api_key)).status_code == 200
    # Queries of the task fail on its channel (`primary`): served from the store each time.
    for _ in range(3):
        upstream.get(f"{PRIMARY}/api/v1/tasks/{TASK_ID}", body=requests.ConnectionError("down"))
        stale = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key))
        assert stale.headers["X-Gateway-Stale"] == "upstream_unreachable"

    one_failing = client.get("/readyz")

    assert (one_failing.status_code, one_failing.get_json()) == (
        200,
        {"status": "ok", "channels": 2, "failing_channels": ["primary"]},
    )
    # Three submits failed on `intl`, as submit_with_failover reports them (each would cool it
    # down for longer first: seconds of a test).
    pool = client.application.extensions["gateway"].pool
    for _ in range(3):
        pool.report_failure(pool.get("intl"))

    all_failing = client.get("/readyz")

    assert (all_failing.status_code, all_failing.get_json()) == (
        503,
        {
            "status": "unavailable",
            "reason": "every channel is failing",
            "channels": 2,
            "failing_channels": ["primary", "intl"],
        },
    )


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_operational_routes_live_outside_the_compatibility_prefix(client: Flask, path: str) -> None:
    assert client.get(path, headers=bearer("sk-not-a-key")).status_code == 200
    assert client.get(f"/alibailian/api/v1{path}").status_code == 404
