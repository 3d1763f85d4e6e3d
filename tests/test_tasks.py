"""Querying tasks: ownership, the task's own channel, stored final answers, bounded refresh."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import update

from app.store import utcnow
from app.store.tables import tasks
from tests.conftest import BASE_CONFIG, PRIMARY, PRIMARY_UPSTREAM_KEY, SUBMIT_PATH, bearer, new_key

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_TASK = f"{PRIMARY}/api/v1/tasks/{TASK_ID}"
NOT_EXIST = {"code": "task_not_exist", "message": "task_not_exist", "data": None}


def task_answer(status: str, **output: Any) -> dict[str, Any]:
    """Return DashScope's answer to a task query."""
    body: dict[str, Any] = {
        "request_id": f"up-{status}",
        "output": {"task_id": TASK_ID, "task_status": status, **output},
    }
    if status == "SUCCEEDED":
        body["usage"] = {"duration": 5, "SR": 480, "video_count": 1}
    return body


def submit(client: FlaskClient, key: str, upstream: responses.RequestsMock) -> None:
    """Submit one task through the gateway, DashScope accepting it as TASK_ID."""
    upstream.post(
        UPSTREAM_SUBMIT,
        json={"request_id": "s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}},
    )
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    assert client.post(SUBMIT_PATH, json=body, headers=bearer(key)).status_code == 200


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """Return the body without its request_id, which differs on every answer."""
    return {k: v for k, v in body.items() if k != "request_id"}


def test_query_asks_the_creating_channel_and_returns_its_answer(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream)
    running = task_answer("RUNNING", submit_time="2026-11-24 10:00:00.000")
    upstream.get(UPSTREAM_TASK, json=running)

    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key))

    assert (response.status_code, response.json) == (200, running)
    assert "X-Gateway-Stale" not in response.headers
    assert upstream.calls[1].request.headers["Authorization"] == f"Bearer {PRIMARY_UPSTREAM_KEY}"
    assert response.headers["X-Request-Id"] == "up-RUNNING"


def test_every_key_of_the_account_sees_its_tasks(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream)
    upstream.get(UPSTREAM_TASK, json=task_answer("RUNNING"))
    second_key = new_key(app, "acme")

    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(second_key))

    assert response.json["output"]["task_status"] == "RUNNING"


@pytest.mark.parametrize(
    "task_id",
    [TASK_ID, "7c4a1e0b-0000-4000-8000-000000000000", "not-a-uuid", "x" * 500, "%00"],
    ids=["another-accounts", "unknown", "malformed", "huge", "nul"],
)
def test_foreign_unknown_and_malformed_tasks_look_the_same(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock, task_id: str
) -> None:
    submit(client, api_key, upstream)
    stranger = new_key(app, "someone-else")

    response = client.get(f"/alibailian/api/v1/tasks/{task_id}", headers=bearer(stranger))

    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert without_request_id(response.json) == NOT_EXIST
    assert len(upstream.calls) == 1  # the submit only: a stranger's query never goes upstream


def test_final_answers_are_served_from_the_store(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream)
    done = task_answer("SUCCEEDED", video_url="https://oss/v.mp4", end_time="2026")
    upstream.get(UPSTREAM_TASK, json=done)
    url = f"/alibailian/api/v1/tasks/{TASK_ID}"

    first = client.get(url, headers=bearer(api_key))
    again = [client.get(url, headers=bearer(api_key)) for _ in range(3)]

    assert first.json == done
    assert all(without_request_id(r.json) == without_request_id(done) for r in again)
    assert len({r.json["request_id"] for r in again}) == 3
    # The stored answer names this request, the id its X-Request-Id header carries too.
    assert all(r.json["request_id"] == r.headers["X-Request-Id"] for r in again)
    assert len(upstream.calls) == 2  # submit + one query
    assert not [r for r in again if "X-Gateway-Stale" in r.headers]  # final: nothing to ask


def test_running_tasks_are_refreshed_at_most_once_per_interval(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("refresh_interval = 0", "refresh_interval = 0.5"))
    client, key = app.test_client(), new_key(app)
    submit(client, key, upstream)
    upstream.get(UPSTREAM_TASK, json=task_answer("RUNNING"))
    url = f"/alibailian/api/v1/tasks/{TASK_ID}"

    early = [client.get(url, headers=bearer(key)).json for _ in range(5)]
    time.sleep(0.6)
    later = [client.get(url, headers=bearer(key)).json for _ in range(5)]

    assert {body["output"]["task_status"] for body in early} == {"PENDING"}
    assert {body["output"]["task_status"] for body in later} == {"RUNNING"}
    assert len(upstream.calls) == 2  # submit + one refresh for ten polls


@pytest.mark.parametrize(
    ("failure", "stale"),
    [
        ({"body": requests.ConnectionError("refused")}, "upstream_unreachable"),
        ({"body": requests.ReadTimeout("slow")}, "upstream_unreachable"),
        ({"status": 502, "body": "<html>bad gateway</html>"}, "upstream_unreachable"),
        (
            {"status": 429, "json": {"request_id": "r", "code": "Throttling", "message": "slow"}},
            "upstream_error",
        ),
        ({"status": 429, "body": "<html>too many requests</html>"}, "upstream_error"),
        (
            {"status": 401, "json": {"request_id": "r", "code": "InvalidApiKey", "message": "bad"}},
            "upstream_error",
        ),
        (
            {"status": 500, "json": {"request_id": "r", "code": "InternalError", "message": "x"}},
            "upstream_error",
        ),
    ],
    ids=["refused", "timeout", "html", "throttled", "throttled-html", "channel-key-refused", "5xx"],
)
def test_a_failed_refresh_serves_the_last_known_status_and_says_it_is_stale(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    failure: dict[str, Any],
    stale: str,
) -> None:
    submit(client, api_key, upstream)
    upstream.get(UPSTREAM_TASK, **failure)

    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key))

    assert response.status_code == 200
    assert response.json["output"] == {"task_id": TASK_ID, "task_status": "PENDING"}
    assert response.headers["X-Gateway-Stale"] == stale


def test_answers_upstream_gave_or_the_store_holds_fresh_are_not_stale(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("refresh_interval = 0", "refresh_interval = 60"))
    client, key = app.test_client(), new_key(app)
    upstream.post(
        UPSTREAM_SUBMIT,
        json={"request_id": "s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}},
    )
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    url = f"/alibailian/api/v1/tasks/{TASK_ID}"
    assert client.post(SUBMIT_PATH, json=body, headers=bearer(key)).status_code == 200

    fresh = client.get(url, headers=bearer(key))  # refreshed less than an interval ago

    assert fresh.json["output"]["task_status"] == "PENDING"
    assert "X-Gateway-Stale" not in fresh.headers


def test_polls_between_refreshes_say_the_last_refresh_failed_until_one_succeeds(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("refresh_interval = 0", "refresh_interval = 60"))
    client, key = app.test_client(), new_key(app)
    submit(client, key, upstream)
    url = f"/alibailian/api/v1/tasks/{TASK_ID}"

    def poll_after_a_due_refresh() -> list[Any]:
        # The next refresh falls due as if an interval had passed, without waiting one.
        with app.extensions["gateway"].engine.begin() as connection:
            connection.execute(update(tasks).values(refreshed_at=utcnow() - timedelta(minutes=2)))
        return [client.get(url, headers=bearer(key)) for _ in range(3)]

    upstream.get(UPSTREAM_TASK, body=requests.ConnectionError("refused"))
    during = poll_after_a_due_refresh()
    upstream.replace(responses.GET, UPSTREAM_TASK, json=task_answer("RUNNING"))
    after = poll_after_a_due_refresh()

    assert [r.headers.get("X-Gateway-Stale") for r in during] == ["upstream_unreachable"] * 3
    assert [r.json["output"]["task_status"] for r in after] == ["RUNNING"] * 3
    assert [r.headers.get("X-Gateway-Stale") for r in after] == [None] * 3
    assert len(upstream.calls) == 3  # submit, the failed refresh, the one that came back


def test_a_stored_final_status_is_never_downgraded(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream)
    upstream.get(UPSTREAM_TASK, json=task_answer("FAILED", code="InternalError.Algo", message="m"))
    url = f"/alibailian/api/v1/tasks/{TASK_ID}"

    client.get(url, headers=bearer(api_key))
    stored = client.get(url, headers=bearer(api_key))

    assert stored.json["output"]["task_status"] == "FAILED"
    assert stored.json["output"]["code"] == "InternalError.Algo"
    assert "code" not in stored.json  # FAILED details stay inside output, as DashScope puts them


def test_tasks_older_than_retention_are_gone(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("[tasks]", "[tasks]\nretention_hours = 0.0001"))
    client, key = app.test_client(), new_key(app)
    submit(client, key, upstream)
    time.sleep(0.5)

    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(key))

    assert without_request_id(response.json) == NOT_EXIST


def test_stored_bodies_keep_upstream_bytes(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream)
    upstream.get(UPSTREAM_TASK, body=json.dumps(task_answer("SUCCEEDED", orig_prompt="猫")))

    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key))
    again = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key))

    assert response.json["output"]["orig_prompt"] == "猫"
    assert again.json["output"]["orig_prompt"] == "猫"
