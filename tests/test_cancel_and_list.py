"""Cancelling a task on its own channel, and listing an account's tasks from the store."""

from __future__ import annotations

from typing import Any

import responses
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import PRIMARY, PRIMARY_UPSTREAM_KEY, SUBMIT_PATH, bearer, new_key

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
TASKS = "/alibailian/api/v1/tasks"


def submit(client: FlaskClient, key: str, upstream: responses.RequestsMock, task_id: str) -> None:
    """Submit a task through the gateway, DashScope accepting it under task_id."""
    upstream.post(
        UPSTREAM_SUBMIT,
        json={"request_id": "s", "output": {"task_id": task_id, "task_status": "PENDING"}},
    )
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    assert client.post(SUBMIT_PATH, json=body, headers=bearer(key)).status_code == 200


def test_cancel_goes_to_the_tasks_channel_and_the_next_query_refreshes(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    upstream.post(f"{PRIMARY}/api/v1/tasks/t-1/cancel", json={"request_id": "c"})
    canceled = {"request_id": "q", "output": {"task_id": "t-1", "task_status": "CANCELED"}}
    upstream.get(f"{PRIMARY}/api/v1/tasks/t-1", json=canceled)

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(api_key))
    query = client.get(f"{TASKS}/t-1", headers=bearer(api_key))

    assert (response.status_code, response.json) == (200, {"request_id": "c"})
    assert upstream.calls[1].request.headers["Authorization"] == f"Bearer {PRIMARY_UPSTREAM_KEY}"
    assert query.json["output"]["task_status"] == "CANCELED"


def test_cancel_passes_upstream_refusal_through(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    refusal = {"request_id": "c", "code": "UnsupportedOperation", "message": "not PENDING"}
    upstream.post(f"{PRIMARY}/api/v1/tasks/t-1/cancel", status=400, json=refusal)

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(api_key))

    assert (response.status_code, response.json) == (400, refusal)


def test_a_cancel_throttled_without_dashscopes_json_is_a_native_429(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    upstream.post(f"{PRIMARY}/api/v1/tasks/t-1/cancel", status=429, body="<html>slow</html>")

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (429, "Throttling")
    assert response.json["request_id"] == response.headers["X-Request-Id"]


def test_cancel_of_a_finished_task_is_refused_without_asking_upstream(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    done = {"request_id": "q", "output": {"task_id": "t-1", "task_status": "SUCCEEDED"}}
    upstream.get(f"{PRIMARY}/api/v1/tasks/t-1", json=done)
    client.get(f"{TASKS}/t-1", headers=bearer(api_key))

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (400, "UnsupportedOperation")
    assert len(upstream.calls) == 2


def test_cancel_of_a_stranger_task_is_task_not_exist(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(new_key(app, "other")))

    assert (response.status_code, response.json["code"]) == (400, "task_not_exist")


def test_a_channel_key_refused_on_cancel_is_not_the_clients_fault(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    upstream.post(f"{PRIMARY}/api/v1/tasks/t-1/cancel", status=401, json={"code": "InvalidApiKey"})

    response = client.post(f"{TASKS}/t-1/cancel", headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")


def test_list_shows_only_the_accounts_tasks_newest_first_in_pages(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    for task_id in ("t-1", "t-2", "t-3"):
        submit(client, api_key, upstream, task_id)
    submit(client, new_key(app, "other"), upstream, "t-other")

    first = client.get(f"{TASKS}?page_size=2", headers=bearer(api_key)).json
    second = client.get(f"{TASKS}?page_size=2&page_no=2", headers=bearer(api_key)).json

    assert (first["total"], first["total_page"], first["page_no"]) == (3, 2, 1)
    assert [item["task_id"] for item in first["data"] + second["data"]] == ["t-3", "t-2", "t-1"]
    assert first["data"][0]["status"] == "PENDING"
    assert first["data"][0]["model_name"] == "wan2.5-t2v-preview"
    assert isinstance(first["data"][0]["gmt_create"], int)


def test_list_filters_by_status_and_model(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(client, api_key, upstream, "t-1")
    submit(client, api_key, upstream, "t-2")
    done = {"request_id": "q", "output": {"task_id": "t-1", "task_status": "SUCCEEDED"}}
    upstream.get(f"{PRIMARY}/api/v1/tasks/t-1", json=done)
    client.get(f"{TASKS}/t-1", headers=bearer(api_key))

    succeeded = client.get(f"{TASKS}?status=SUCCEEDED", headers=bearer(api_key)).json
    other_model = client.get(f"{TASKS}?model_name=wan2.2-t2v-plus", headers=bearer(api_key)).json

    assert [item["task_id"] for item in succeeded["data"]] == ["t-1"]
    assert succeeded["data"][0]["end_time"] is not None
    assert other_model["total"] == 0


def test_list_rejects_bad_filters_natively(client: FlaskClient, api_key: str) -> None:
    cases: list[tuple[str, Any]] = [
        ("page_size=1000", "page_size"),
        ("page_no=0", "page_no"),
        # Past what a database integer holds: OverflowError (SQLite), DataError (PostgreSQL).
        ("page_no=9223372036854775807", "page_no"),
        ("page_no=2147483648", "page_no"),
        ("page_no=-9223372036854775809", "page_no"),
        (f"page_no={10**40}", "page_no"),
        ("page_size=9223372036854775807", "page_size"),
        ("page_size=-9223372036854775809", "page_size"),
        ("status=DONE", "status"),
        ("start_time=yesterday", "start_time"),
        ("start_time=99999999999999", "start_time"),
        ("end_time=00000101000000", "end_time"),
        # PostgreSQL's text cannot hold a NUL: refused before the database sees it.
        ("model_name=wan%00", "model_name"),
    ]
    for query, field in cases:
        response = client.get(f"{TASKS}?{query}", headers=bearer(api_key))
        assert (response.status_code, response.json["code"]) == (400, "InvalidParameter")
        assert response.json["message"].startswith(f"{field}: ")


def test_the_last_page_number_allowed_is_an_empty_page(client: FlaskClient, api_key: str) -> None:
    response = client.get(f"{TASKS}?page_no=2147483647&page_size=100", headers=bearer(api_key))

    assert response.status_code == 200
    assert (response.json["page_no"], response.json["data"]) == (2147483647, [])
