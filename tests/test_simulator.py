"""Tests for the DashScope simulator, in-process and as a real HTTP server."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from simulator import create_simulator

T2V = "/api/v1/services/aigc/video-generation/video-synthesis"
KF2V = "/api/v1/services/aigc/image2video/video-synthesis"
KEY = "sk-good"
OTHER_KEY = "sk-other"
REPO_ROOT = Path(__file__).resolve().parents[1]


def headers(key: str | None = KEY, async_: str | None = "enable") -> dict[str, str]:
    """Build request headers the way a well-behaved caller would."""
    result = {}
    if key is not None:
        result["Authorization"] = f"Bearer {key}"
    if async_ is not None:
        result["X-DashScope-Async"] = async_
    return result


def body(prompt: str = "a cat on a skateboard", **parameters: Any) -> dict[str, Any]:
    """Build a minimal submit body."""
    return {"model": "wan2.5-t2v-preview", "input": {"prompt": prompt}, "parameters": parameters}


@pytest.fixture
def client() -> FlaskClient:
    """Return a test client for a simulator with short, testable timings."""
    app = create_simulator(
        {"keys": [KEY, OTHER_KEY], "pending_seconds": 0.05, "running_seconds": 0.05}
    )
    return app.test_client()


def submit(client: FlaskClient, **kwargs: Any) -> str:
    """Submit a task and return its id."""
    resp = client.post(T2V, json=body(**kwargs), headers=headers())
    assert resp.status_code == 200, resp.json
    return resp.json["output"]["task_id"]


def assert_error(resp: Any, status: int, code: str, message: str | None = None) -> None:
    """Check a DashScope-shaped JSON error answer."""
    assert resp.status_code == status
    assert resp.mimetype == "application/json"
    assert set(resp.json) == {"request_id", "code", "message"}
    assert resp.json["code"] == code
    if message is not None:
        assert resp.json["message"] == message


def test_submit_success_shape(client: FlaskClient) -> None:
    resp = client.post(T2V, json=body(), headers=headers())
    assert resp.status_code == 200
    assert resp.json["request_id"]
    assert resp.json["output"]["task_status"] == "PENDING"
    assert resp.json["output"]["task_id"]


def test_kf2v_route_accepts_submits(client: FlaskClient) -> None:
    resp = client.post(KF2V, json=body(), headers=headers())
    assert resp.status_code == 200
    assert resp.json["output"]["task_status"] == "PENDING"


def test_missing_key(client: FlaskClient) -> None:
    resp = client.post(T2V, json=body(), headers=headers(key=None))
    assert_error(resp, 401, "InvalidApiKey", "No API-key provided.")


def test_bad_key(client: FlaskClient) -> None:
    resp = client.post(T2V, json=body(), headers=headers(key="sk-nope"))
    assert_error(resp, 401, "InvalidApiKey", "Invalid API-key provided.")


def test_any_key_accepted_without_key_list() -> None:
    client = create_simulator().test_client()
    assert client.post(T2V, json=body(), headers=headers(key="whatever")).status_code == 200
    resp = client.post(T2V, json=body(), headers={"Authorization": "Bearer ", **headers(None)})
    assert_error(resp, 401, "InvalidApiKey", "No API-key provided.")


def test_async_header_required(client: FlaskClient) -> None:
    resp = client.post(T2V, json=body(), headers=headers(async_=None))
    assert_error(resp, 403, "AccessDenied", "current user api does not support synchronous calls")


def test_async_header_value_is_case_insensitive(client: FlaskClient) -> None:
    assert client.post(T2V, json=body(), headers=headers(async_="ENABLE")).status_code == 200


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ([1, 2], "InvalidParameter"),
        ({"input": {"prompt": "x"}}, "BadRequest.EmptyModel"),
        ({"model": "wan2.5-t2v-preview"}, "BadRequest.EmptyInput"),
    ],
)
def test_body_validation(client: FlaskClient, payload: Any, code: str) -> None:
    assert_error(client.post(T2V, json=payload, headers=headers()), 400, code)


def test_body_not_json(client: FlaskClient) -> None:
    resp = client.post(T2V, data="not json", headers=headers())
    assert_error(resp, 400, "InvalidParameter")


@pytest.mark.parametrize(
    ("marker", "status", "code", "message"),
    [
        (
            "[moderate]",
            400,
            "DataInspectionFailed",
            "Input data may contain inappropriate content.",
        ),
        (
            "[throttle]",
            429,
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
        ),
        ("[error500]", 500, "InternalError", None),
    ],
)
def test_error_markers(
    client: FlaskClient, marker: str, status: int, code: str, message: str | None
) -> None:
    resp = client.post(T2V, json=body(f"a cat {marker}"), headers=headers())
    assert_error(resp, status, code, message)


def test_sleep_marker_delays_then_succeeds(client: FlaskClient) -> None:
    started = time.monotonic()
    resp = client.post(T2V, json=body("slow [sleep=0.2]"), headers=headers())
    assert time.monotonic() - started >= 0.2
    assert resp.status_code == 200


def test_lifecycle_to_succeeded() -> None:
    # Wider windows than the fixture so a slow machine cannot skip the RUNNING state.
    client = create_simulator({"pending_seconds": 0.2, "running_seconds": 0.2}).test_client()
    task_id = submit(client, resolution="720P", duration=10)
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        resp = client.get(f"/api/v1/tasks/{task_id}", headers=headers(async_=None))
        assert resp.status_code == 200
        status = resp.json["output"]["task_status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "SUCCEEDED":
            break
        time.sleep(0.01)
    assert seen == ["PENDING", "RUNNING", "SUCCEEDED"]

    output = resp.json["output"]
    assert output["task_id"] == task_id
    for key in ("submit_time", "scheduled_time", "end_time"):
        assert len(output[key]) == len("2025-01-01 00:00:00.000")
        time.strptime(output[key][:19], "%Y-%m-%d %H:%M:%S")
    assert output["video_url"].startswith(f"http://localhost/videos/{task_id}.mp4?Expires=")
    assert output["orig_prompt"] == "a cat on a skateboard"
    assert resp.json["usage"] == {"duration": 10, "SR": 720, "video_count": 1}
    assert "code" not in resp.json
    assert client.get(output["video_url"]).mimetype == "video/mp4"


def test_usage_defaults(client: FlaskClient) -> None:
    task_id = submit(client)
    time.sleep(0.15)
    resp = client.get(f"/api/v1/tasks/{task_id}", headers=headers())
    assert resp.json["usage"] == {"duration": 5, "SR": 480, "video_count": 1}


def test_running_has_scheduled_time_pending_does_not() -> None:
    client = create_simulator({"pending_seconds": 0.05, "running_seconds": 5}).test_client()
    task_id = submit(client)
    pending = client.get(f"/api/v1/tasks/{task_id}", headers=headers()).json["output"]
    assert pending["task_status"] == "PENDING"
    assert "scheduled_time" not in pending
    assert "submit_time" in pending
    time.sleep(0.1)
    running = client.get(f"/api/v1/tasks/{task_id}", headers=headers()).json["output"]
    assert running["task_status"] == "RUNNING"
    assert "scheduled_time" in running
    assert "end_time" not in running


def test_fail_marker_ends_failed(client: FlaskClient) -> None:
    task_id = submit(client, prompt="doomed [fail]")
    time.sleep(0.15)
    resp = client.get(f"/api/v1/tasks/{task_id}", headers=headers())
    assert resp.status_code == 200
    output = resp.json["output"]
    assert output["task_status"] == "FAILED"
    assert output["code"] == "InternalError.Algo"
    assert output["message"]
    assert "end_time" in output
    assert "code" not in resp.json
    assert "message" not in resp.json


def test_foreign_and_unknown_tasks_are_unknown(client: FlaskClient) -> None:
    task_id = submit(client)
    foreign = client.get(f"/api/v1/tasks/{task_id}", headers=headers(key=OTHER_KEY))
    unknown = client.get("/api/v1/tasks/no-such-task", headers=headers())
    for resp, expected_id in ((foreign, task_id), (unknown, "no-such-task")):
        assert resp.status_code == 200
        assert resp.json["output"] == {"task_id": expected_id, "task_status": "UNKNOWN"}


def test_query_requires_auth(client: FlaskClient) -> None:
    task_id = submit(client)
    resp = client.get(f"/api/v1/tasks/{task_id}")
    assert_error(resp, 401, "InvalidApiKey", "No API-key provided.")


def test_cancel_pending_task() -> None:
    client = create_simulator({"pending_seconds": 5}).test_client()
    task_id = submit(client)
    resp = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=headers(async_=None))
    assert resp.status_code == 200
    assert set(resp.json) == {"request_id"}
    output = client.get(f"/api/v1/tasks/{task_id}", headers=headers()).json["output"]
    assert output["task_status"] == "CANCELED"
    assert "end_time" in output
    again = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=headers())
    assert_error(again, 400, "UnsupportedOperation")


def test_cancel_running_task_is_unsupported() -> None:
    client = create_simulator({"pending_seconds": 0.05, "running_seconds": 5}).test_client()
    task_id = submit(client)
    time.sleep(0.1)
    resp = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=headers())
    assert_error(
        resp,
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task status is PENDING.",
    )


def test_cancel_unknown_or_foreign_is_not_found() -> None:
    client = create_simulator({"keys": [KEY, OTHER_KEY], "pending_seconds": 5}).test_client()
    task_id = submit(client)
    assert_error(
        client.post(f"/api/v1/tasks/{task_id}/cancel", headers=headers(key=OTHER_KEY)),
        404,
        "NotFound",
    )
    assert_error(client.post("/api/v1/tasks/nope/cancel", headers=headers()), 404, "NotFound")


def test_flask_404_and_405_are_json(client: FlaskClient) -> None:
    assert_error(client.get("/api/v1/nowhere", headers=headers()), 404, "NotFound")
    assert_error(client.get(T2V, headers=headers()), 405, "MethodNotAllowed")


def test_stats_and_reset(client: FlaskClient) -> None:
    task_id = submit(client)
    client.get(f"/api/v1/tasks/{task_id}", headers=headers())
    client.get(f"/api/v1/tasks/{task_id}", headers=headers())
    client.post(KF2V, json={"model": "wan2.2-kf2v-flash", "input": {}}, headers=headers())

    stats = client.get("/_sim/stats").json
    assert stats["requests_total"] == 4
    assert stats["submits"] == 2
    assert stats["queries"] == 2
    assert stats["queries_by_task"] == {task_id: 2}
    last = stats["last_submit"]
    assert last["path"] == KF2V
    assert last["body"] == {"model": "wan2.2-kf2v-flash", "input": {}}
    assert last["headers"]["authorization"] == f"Bearer {KEY}"
    assert last["headers"]["x-dashscope-async"] == "enable"

    assert client.post("/_sim/reset").status_code == 200
    stats = client.get("/_sim/stats").json
    assert (stats["requests_total"], stats["submits"], stats["queries"]) == (0, 0, 0)
    assert stats["queries_by_task"] == {}
    assert stats["last_submit"] is None
    resp = client.get(f"/api/v1/tasks/{task_id}", headers=headers())
    assert resp.json["output"]["task_status"] == "UNKNOWN"


def test_latency_is_added() -> None:
    client = create_simulator({"latency_ms": 100}).test_client()
    started = time.monotonic()
    client.get("/api/v1/tasks/x", headers=headers())
    assert time.monotonic() - started >= 0.1


def test_runs_as_a_process() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator",
            "--port",
            "0",
            "--keys",
            KEY,
            "--pending-seconds",
            "0.05",
            "--running-seconds",
            "0.05",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # readline() blocks, so read on a thread to bound the wait.
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=10).strip()
        assert line.startswith("simulator listening on http://127.0.0.1:")
        base = line.removeprefix("simulator listening on ")
        assert not base.endswith(":0")

        resp = requests.post(base + T2V, json=body(), headers=headers(), timeout=5)
        assert resp.status_code == 200
        task_id = resp.json()["output"]["task_id"]
        time.sleep(0.15)
        resp = requests.get(f"{base}/api/v1/tasks/{task_id}", headers=headers(), timeout=5)
        assert resp.json()["output"]["task_status"] == "SUCCEEDED"
        assert resp.json()["output"]["video_url"].startswith(f"{base}/videos/{task_id}.mp4")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0
