"""Structured logs: one JSON line per request and per upstream call, and never a secret."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import requests
import responses
from flask.testing import FlaskClient

from app.observability.access import new_request_id
from app.observability.logs import json_formatter
from tests.conftest import (
    INTL_UPSTREAM_KEY,
    PRIMARY,
    PRIMARY_UPSTREAM_KEY,
    SUBMIT_PATH,
    bearer,
)

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_TASK = f"{PRIMARY}/api/v1/tasks/{TASK_ID}"
ACCEPTED = {"request_id": "up-submit", "output": {"task_id": TASK_ID, "task_status": "PENDING"}}
# A base64 image as clients send them; its text must never reach a log.
IMAGE_MARKER = base64.b64encode(b"\x89PNG-never-log-this-image-" * 8).decode()
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the gateway's records from INFO up."""
    caplog.set_level(logging.INFO)
    return caplog


def lines_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict[str, object]]:
    """Return the captured records of one logger as the JSON objects the formatter writes."""
    formatter = json_formatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == logger]


def test_one_access_line_per_request_with_who_what_and_where(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    logs: pytest.LogCaptureFixture,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}

    response = client.post(SUBMIT_PATH, json=body, headers=bearer(api_key))

    assert response.status_code == 200
    [line] = lines_of(logs, "bailian_gateway.access")
    duration = line.pop("duration_ms")
    assert isinstance(duration, float)
    assert duration >= 0
    assert isinstance(line.pop("time"), str)
    assert isinstance(line.pop("request_id"), str)
    assert isinstance(line.pop("key_id"), int)
    assert line == {
        "level": "INFO",
        "logger": "bailian_gateway.access",
        "message": "POST compat.submit_video_synthesis 200",
        "method": "POST",
        "route": "compat.submit_video_synthesis",
        "status": 200,
        "account": "acme",
        "model": "wan2.5-t2v-preview",
        "channel": "primary",
        "upstream_status": 200,
        "upstream_request_id": "up-submit",
        "task_id": TASK_ID,
    }


def test_a_gateway_error_is_logged_under_the_id_the_client_sees(
    client: FlaskClient, logs: pytest.LogCaptureFixture
) -> None:
    response = client.get(f"/alibailian/api/v1/tasks/{TASK_ID}")

    [line] = lines_of(logs, "bailian_gateway.access")
    assert response.status_code == 401
    assert line["request_id"] == response.json["request_id"] == response.headers["X-Request-Id"]
    assert (line["route"], line["status"], line["account"], line["key_id"]) == (
        "compat.get_task",
        401,
        None,
        None,
    )


def test_request_ids_are_uuid4s_that_forked_workers_do_not_repeat(client: FlaskClient) -> None:
    answered = [client.get("/healthz").headers["X-Request-Id"] for _ in range(50)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a gunicorn worker is forked the same way
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    in_child, in_parent = os.read(read, 100).decode(), new_request_id()
    os.close(read)
    os.close(write)

    assert all(str(uuid.UUID(value)) == value for value in answered)
    assert {uuid.UUID(value).version for value in answered} == {4}
    assert len(set(answered)) == len(answered)
    assert in_child != in_parent


def submit_and_query(client: FlaskClient, api_key: str, upstream: responses.RequestsMock) -> None:
    """Submit a task and query it once, both answered by DashScope."""
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(
        UPSTREAM_TASK, json={"request_id": "up-query", "output": {"task_status": "RUNNING"}}
    )
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    assert client.post(SUBMIT_PATH, json=body, headers=bearer(api_key)).status_code == 200

    assert (
        client.get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(api_key)).status_code
        == 200
    )


def test_an_answered_upstream_call_is_in_the_access_line_and_its_own_only_at_debug(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    logs: pytest.LogCaptureFixture,
) -> None:
    submit_and_query(client, api_key, upstream)

    assert lines_of(logs, "bailian_gateway.upstream") == []
    submitted, queried = lines_of(logs, "bailian_gateway.access")
    fields = ("channel", "upstream_status", "upstream_request_id", "task_id")
    assert {k: submitted[k] for k in fields} == {
        "channel": "primary",
        "upstream_status": 200,
        "upstream_request_id": ACCEPTED["request_id"],
        "task_id": TASK_ID,
    }
    assert {k: queried[k] for k in fields} == {
        "channel": "primary",
        "upstream_status": 200,
        "upstream_request_id": "up-query",
        "task_id": TASK_ID,
    }


def test_at_debug_one_upstream_line_per_call_with_the_path_template(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    logs: pytest.LogCaptureFixture,
) -> None:
    logs.set_level(logging.DEBUG, logger="bailian_gateway")
    submit_and_query(client, api_key, upstream)

    submitted, queried = lines_of(logs, "bailian_gateway.upstream")
    access = lines_of(logs, "bailian_gateway.access")
    assert [submitted["request_id"], queried["request_id"]] == [a["request_id"] for a in access]
    assert submitted["path"] == "/api/v1/services/aigc/video-generation/video-synthesis"
    assert {k: queried[k] for k in ("channel", "method", "path", "status", "outcome")} == {
        "channel": "primary",
        "method": "GET",
        "path": "/api/v1/tasks/{task_id}",
        "status": 200,
        "outcome": "ok",
    }
    assert (queried["upstream_request_id"], queried["task_id"]) == ("up-query", TASK_ID)
    assert isinstance(queried["duration_ms"], float)
    assert access[1]["model"] == "wan2.5-t2v-preview"
    assert access[1]["upstream_status"] == 200


def test_a_failed_upstream_call_is_a_warning_with_its_outcome(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    logs: pytest.LogCaptureFixture,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout("slow"))
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}

    assert client.post(SUBMIT_PATH, json=body, headers=bearer(api_key)).status_code == 504

    [call] = lines_of(logs, "bailian_gateway.upstream")
    [access] = lines_of(logs, "bailian_gateway.access")
    assert (call["level"], call["outcome"], call["status"], call["channel"]) == (
        "WARNING",
        "timeout",
        None,
        "primary",
    )
    assert (access["status"], access["channel"], access["upstream_status"]) == (
        504,
        "primary",
        None,
    )


def test_no_key_authorization_header_or_body_reaches_any_log(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    logs: pytest.LogCaptureFixture,
) -> None:
    image = f"data:image/png;base64,{IMAGE_MARKER}"
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.post(UPSTREAM_SUBMIT, status=400, json={"request_id": "r", "code": "InvalidParameter"})
    upstream.post(UPSTREAM_SUBMIT, body=requests.ConnectionError("reset by peer"))
    good = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p", "img_url": image}}
    for headers in (bearer(api_key), bearer(api_key), bearer(api_key)):
        client.post(SUBMIT_PATH, json=good, headers=headers)
    client.post(
        SUBMIT_PATH, json={**good, "parameters": {"duration": image}}, headers=bearer(api_key)
    )
    client.post(SUBMIT_PATH, json=good, headers=bearer(PRIMARY_UPSTREAM_KEY))
    client.post(SUBMIT_PATH, json={**good, "model": api_key}, headers=bearer(api_key))
    client.post(SUBMIT_PATH, data=f"not json {image}", headers={"Authorization": api_key})

    formatter = json_formatter()
    text = "\n".join(formatter.format(record) for record in logs.records)
    assert len(lines_of(logs, "bailian_gateway.access")) == 7
    for secret in (api_key, PRIMARY_UPSTREAM_KEY, INTL_UPSTREAM_KEY, IMAGE_MARKER[:40]):
        assert secret not in text
        assert secret.removeprefix("sk-") not in text
    assert "Bearer" not in text


def test_outside_gunicorn_the_app_logs_json_lines_to_stderr(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from app import create_app
        app = create_app({{"GATEWAY_DATABASE_URL": "sqlite:///{tmp_path / "g.sqlite3"}"}})
        assert app.test_client().get("/healthz").status_code == 200
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PROMETHEUS"))}

    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    lines = [json.loads(line) for line in done.stderr.splitlines()]
    [access] = [line for line in lines if line["logger"] == "bailian_gateway.access"]
    assert (access["route"], access["status"], access["level"]) == ("health.healthz", 200, "INFO")
    assert access["request_id"]
    assert done.stdout == ""
