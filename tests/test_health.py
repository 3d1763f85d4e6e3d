"""Liveness and readiness: /healthz touches nothing, /readyz checks the database and channels."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from app import create_app
from app.store.engine import POSTGRESQL_LOCK_TIMEOUT_MS, SQLITE_BUSY_TIMEOUT_MS
from app.store.tables import submissions
from tests.conftest import (
    BASE_CONFIG,
    INTL_UPSTREAM_KEY,
    PRIMARY,
    PRIMARY_UPSTREAM_KEY,
    SUBMIT_PATH,
    app_over,
    bearer,
)
from tests.test_paid_work import postgresql_of_its_own

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


# A probe waits at most this long for a lock another connection holds (the same on both
# backends), and answers within it and a margin.
LOCK_WAIT_SECONDS = POSTGRESQL_LOCK_TIMEOUT_MS / 1000
assert LOCK_WAIT_SECONDS == SQLITE_BUSY_TIMEOUT_MS / 1000
MARGIN_SECONDS = 5


def timed_readiness(client: FlaskClient) -> tuple[Any, float]:
    """Return /readyz's answer and how long it took."""
    started = time.monotonic()
    response = client.get("/readyz")
    return response, time.monotonic() - started


def count_submissions(app: Flask) -> int:
    """Read the database through the app's own pool."""
    with app.extensions["gateway"].engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(submissions)).scalar_one())


def test_readyz_is_503_within_the_busy_timeout_while_another_connection_locks_out_writers(
    breakable_app: Flask, tmp_path: Path
) -> None:
    client = breakable_app.test_client()
    assert client.get("/readyz").status_code == 200
    holder = sqlite3.connect(tmp_path / "db" / "gateway.sqlite3", isolation_level=None)
    try:
        # In the gateway's journal mode (WAL) an exclusive lock keeps writers out, not readers.
        assert holder.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        holder.execute("BEGIN EXCLUSIVE")
        response, waited = timed_readiness(client)
        assert count_submissions(breakable_app) == 0  # the database reads
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()

    assert (response.status_code, response.get_json()) == (
        503,
        {"status": "unavailable", "reason": "database cannot be written: OperationalError"},
    )
    assert waited < LOCK_WAIT_SECONDS + MARGIN_SECONDS
    assert client.get("/readyz").status_code == 200


def test_readyz_is_503_at_once_while_postgresql_is_read_only_and_200_once_it_is_not(
    write_config: Callable[[str], str], tmp_path: Path
) -> None:
    with postgresql_of_its_own() as database:
        app = app_over(database.url, write_config(BASE_CONFIG), tmp_path)
        client = app.test_client()
        try:
            assert client.get("/readyz").status_code == 200
            # A failover to a standby: sessions dropped, and new ones read-only.
            database.refuse_writes()
            response, waited = timed_readiness(client)
            assert count_submissions(app) == 0  # the database reads
            # The read-only sessions opened meanwhile stay open, and say nothing of the server
            # now: the first probe after must not answer from one of them.
            database.allow_writes(drop_sessions=False)
            again = client.get("/readyz")
        finally:
            app.extensions["gateway"].engine.dispose()

    assert (response.status_code, response.get_json()) == (
        503,
        {"status": "unavailable", "reason": "database cannot be written: InternalError"},
    )
    assert waited < MARGIN_SECONDS  # refused at once: nothing to wait for
    assert again.status_code == 200, again.get_json()


def test_readyz_is_503_within_the_lock_timeout_while_postgresql_locks_out_writers(
    write_config: Callable[[str], str], tmp_path: Path
) -> None:
    with postgresql_of_its_own() as database:
        app = app_over(database.url, write_config(BASE_CONFIG), tmp_path)
        client = app.test_client()
        try:
            assert client.get("/readyz").status_code == 200
            # Another session's lock on the table every submit writes ahead to: EXCLUSIVE lets
            # readers in, and no writer.
            with database.locked("submissions", "EXCLUSIVE"):
                response, waited = timed_readiness(client)
                assert count_submissions(app) == 0  # the database reads
            after = client.get("/readyz")
        finally:
            app.extensions["gateway"].engine.dispose()

    assert (response.status_code, response.get_json()) == (
        503,
        {"status": "unavailable", "reason": "database cannot be written: OperationalError"},
    )
    assert LOCK_WAIT_SECONDS - 1 < waited < LOCK_WAIT_SECONDS + MARGIN_SECONDS
    assert after.status_code == 200


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
