"""Tests for the DashScope simulator, in-process and as a real HTTP server."""

from __future__ import annotations

import io
import queue
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from simulator import create_simulator
from simulator.__main__ import parse_args

T2V = "/api/v1/services/aigc/video-generation/video-synthesis"
KF2V = "/api/v1/services/aigc/image2video/video-synthesis"
KEY = "sk-good"
OTHER_KEY = "sk-other"
REPO_ROOT = Path(__file__).resolve().parents[1]
BEIJING = timezone(timedelta(hours=8))
LIST_ITEM_FIELDS = {
    "task_id",
    "status",
    "model_name",
    "gmt_create",
    "end_time",
    "api_key_id",
    "request_id",
    "region",
}


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


def list_tasks(client: FlaskClient, key: str = KEY, **params: Any) -> Any:
    """List tasks with a key and return the answer."""
    return client.get("/api/v1/tasks", query_string=params, headers=headers(key, async_=None))


def beijing(moment: datetime) -> str:
    """Format a moment as a task-list time filter: YYYYMMDDhhmmss in Beijing time."""
    return moment.astimezone(BEIJING).strftime("%Y%m%d%H%M%S")


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


def test_pending_marker_keeps_one_task_pending_then_runs(client: FlaskClient) -> None:
    held = submit(client, prompt="hold on [pending=0.4]")
    other = submit(client)
    time.sleep(0.15)
    assert query_status(client, other) == "SUCCEEDED"
    assert query_status(client, held) == "PENDING"
    listed = client.get("/_sim/stats").json["task_list"]
    assert {task["task_id"]: task["input"]["prompt"] for task in listed}[
        held
    ] == "hold on [pending=0.4]"
    time.sleep(0.4)
    done = client.get(f"/api/v1/tasks/{held}", headers=headers()).json["output"]
    assert done["task_status"] == "SUCCEEDED"
    # It was scheduled when its own PENDING time ran out, not the simulator's default.
    scheduled = datetime.strptime(done["scheduled_time"], "%Y-%m-%d %H:%M:%S.%f")
    submitted = datetime.strptime(done["submit_time"], "%Y-%m-%d %H:%M:%S.%f")
    assert abs((scheduled - submitted).total_seconds() - 0.4) < 0.01


def query_status(client: FlaskClient, task_id: str) -> str:
    """Return a task's status as the query answers it."""
    return str(
        client.get(f"/api/v1/tasks/{task_id}", headers=headers()).json["output"]["task_status"]
    )


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
            "--answer-after",
            "0.2",
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

        started = time.monotonic()
        resp = requests.post(base + T2V, json=body(), headers=headers(), timeout=5)
        assert time.monotonic() - started >= 0.2
        assert resp.status_code == 200
        task_id = resp.json()["output"]["task_id"]
        time.sleep(0.15)
        resp = requests.get(f"{base}/api/v1/tasks/{task_id}", headers=headers(), timeout=5)
        assert resp.json()["output"]["task_status"] == "SUCCEEDED"
        assert resp.json()["output"]["video_url"].startswith(f"{base}/videos/{task_id}.mp4")
        listed = requests.get(f"{base}/api/v1/tasks", headers=headers(), timeout=5).json()
        assert [(i["task_id"], i["status"]) for i in listed["data"]] == [(task_id, "SUCCEEDED")]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == 0


def test_list_is_scoped_to_the_key_newest_first() -> None:
    client = create_simulator({"keys": [KEY, OTHER_KEY], "pending_seconds": 5}).test_client()
    before = time.time()
    submits = []
    for n in range(3):
        resp = client.post(T2V, json=body(f"mine {n}"), headers=headers())
        submits.append(resp.json)
    client.post(T2V, json=body("theirs"), headers=headers(OTHER_KEY))

    resp = list_tasks(client)
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    answer = resp.json
    assert set(answer) == {"request_id", "total", "total_page", "page_no", "page_size", "data"}
    assert (answer["total"], answer["total_page"], answer["page_no"], answer["page_size"]) == (
        3,
        1,
        1,
        10,
    )
    newest_first = [s["output"]["task_id"] for s in reversed(submits)]
    assert [item["task_id"] for item in answer["data"]] == newest_first
    for item, submitted in zip(answer["data"], reversed(submits), strict=True):
        assert set(item) == LIST_ITEM_FIELDS
        assert item["status"] == "PENDING"
        assert item["model_name"] == "wan2.5-t2v-preview"
        assert isinstance(item["gmt_create"], int)
        assert before * 1000 - 1 <= item["gmt_create"] <= time.time() * 1000
        assert item["end_time"] is None
        assert isinstance(item["api_key_id"], str)
        assert item["request_id"] == submitted["request_id"]
        assert item["region"] == "cn-beijing"
    assert len({item["api_key_id"] for item in answer["data"]}) == 1

    theirs = list_tasks(client, OTHER_KEY).json
    assert theirs["total"] == 1
    assert theirs["data"][0]["api_key_id"] != answer["data"][0]["api_key_id"]
    assert theirs["data"][0]["task_id"] not in newest_first


def test_list_shows_end_time_of_finished_tasks(client: FlaskClient) -> None:
    task_id = submit(client)
    time.sleep(0.15)
    item = list_tasks(client).json["data"][0]
    assert (item["task_id"], item["status"]) == (task_id, "SUCCEEDED")
    assert isinstance(item["end_time"], int)
    # The fixture's task is PENDING 50 ms, then RUNNING 50 ms.
    assert item["end_time"] - item["gmt_create"] in (99, 100, 101)


def test_list_filters_by_model_and_status() -> None:
    client = create_simulator({"pending_seconds": 5}).test_client()
    t2v = submit(client)
    kf2v = client.post(KF2V, json={"model": "wan2.2-kf2v-flash", "input": {}}, headers=headers())
    kf2v_id = kf2v.json["output"]["task_id"]
    client.post(f"/api/v1/tasks/{t2v}/cancel", headers=headers())

    by_model = list_tasks(client, model_name="wan2.2-kf2v-flash").json
    assert [item["task_id"] for item in by_model["data"]] == [kf2v_id]
    assert by_model["total"] == 1
    assert list_tasks(client, model_name="wan-nothing").json["total"] == 0

    canceled = list_tasks(client, status="CANCELED").json
    assert [(item["task_id"], item["status"]) for item in canceled["data"]] == [(t2v, "CANCELED")]
    assert isinstance(canceled["data"][0]["end_time"], int)
    assert [item["task_id"] for item in list_tasks(client, status="PENDING").json["data"]] == [
        kf2v_id
    ]
    for status in ("RUNNING", "SUSPENDED", "SUCCEEDED", "FAILED"):
        answer = list_tasks(client, status=status).json
        assert (answer["total"], answer["total_page"], answer["data"]) == (0, 0, [])
    both = list_tasks(client, status="PENDING", model_name="wan2.5-t2v-preview").json
    assert both["total"] == 0


def test_list_status_follows_the_clock(client: FlaskClient) -> None:
    ok = submit(client)
    failed = submit(client, prompt="doomed [fail]")
    time.sleep(0.15)
    assert [item["task_id"] for item in list_tasks(client, status="SUCCEEDED").json["data"]] == [ok]
    assert [item["task_id"] for item in list_tasks(client, status="FAILED").json["data"]] == [
        failed
    ]


def test_list_time_window_is_beijing_time(client: FlaskClient) -> None:
    task_id = submit(client)
    now = datetime.now(UTC)
    around = {"start_time": beijing(now - timedelta(minutes=1)), "end_time": beijing(now)}
    assert [item["task_id"] for item in list_tasks(client, **around).json["data"]] == [task_id]
    # The same wall-clock digits read as UTC would be eight hours off: nothing is listed.
    as_utc = {
        "start_time": (now - timedelta(minutes=1)).strftime("%Y%m%d%H%M%S"),
        "end_time": now.strftime("%Y%m%d%H%M%S"),
    }
    assert list_tasks(client, **as_utc).json["total"] == 0
    assert list_tasks(client, start_time=beijing(now + timedelta(minutes=1))).json["total"] == 0
    assert list_tasks(client, end_time=beijing(now - timedelta(minutes=1))).json["total"] == 0
    assert list_tasks(client, start_time=beijing(now - timedelta(days=3))).json["total"] == 1
    day = {"start_time": beijing(now - timedelta(hours=24)), "end_time": beijing(now)}
    assert list_tasks(client, **day).json["total"] == 1


def test_list_pages(client: FlaskClient) -> None:
    ids = [submit(client, prompt=f"task {n}") for n in range(5)]
    pages = [list_tasks(client, page_no=n, page_size=2).json for n in (1, 2, 3, 4)]
    for n, page in enumerate(pages, start=1):
        assert (page["total"], page["total_page"], page["page_no"], page["page_size"]) == (
            5,
            3,
            n,
            2,
        )
    assert [len(page["data"]) for page in pages] == [2, 2, 1, 0]
    listed = [item["task_id"] for page in pages for item in page["data"]]
    assert listed == list(reversed(ids))
    assert list_tasks(client, page_size=100).json["total_page"] == 1
    assert list_tasks(client, page_size=5).json["total_page"] == 1


def test_list_of_nothing(client: FlaskClient) -> None:
    answer = list_tasks(client).json
    assert answer["request_id"]
    assert {k: v for k, v in answer.items() if k != "request_id"} == {
        "total": 0,
        "total_page": 0,
        "page_no": 1,
        "page_size": 10,
        "data": [],
    }


@pytest.mark.parametrize(
    "params",
    [
        {"page_no": "0"},
        {"page_no": "abc"},
        {"page_no": "-1"},
        {"page_no": ""},
        {"page_size": "0"},
        {"page_size": "101"},
        {"page_size": "2.5"},
        {"status": "UNKNOWN"},
        {"status": "succeeded"},
        {"start_time": "2025-01-01"},
        {"start_time": "20251301000000"},
        {"end_time": "2025010100000"},
        {"start_time": "20250102000000", "end_time": "20250101000000"},
        {"start_time": "20250101000000", "end_time": "20250102000001"},
    ],
)
def test_list_bad_params(client: FlaskClient, params: dict[str, str]) -> None:
    assert_error(list_tasks(client, **params), 400, "InvalidParameter")


def test_list_window_of_exactly_a_day_is_allowed(client: FlaskClient) -> None:
    resp = list_tasks(client, start_time="20250101000000", end_time="20250102000000")
    assert resp.status_code == 200
    assert resp.json["total"] == 0


def test_list_requires_auth(client: FlaskClient) -> None:
    submit(client)
    assert_error(list_tasks(client, key=None), 401, "InvalidApiKey", "No API-key provided.")
    assert_error(
        list_tasks(client, key="sk-nope"), 401, "InvalidApiKey", "Invalid API-key provided."
    )


def wait_for(condition: Any, timeout: float = 5) -> None:
    """Poll until condition() is true or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_answer_after_marker_stores_the_task_before_answering(client: FlaskClient) -> None:
    app = client.application
    answers: queue.Queue[Any] = queue.Queue()

    def slow_submit() -> None:
        started = time.monotonic()
        resp = app.test_client().post(T2V, json=body("late [answer-after=1]"), headers=headers())
        answers.put((resp, time.monotonic() - started))

    thread = threading.Thread(target=slow_submit)
    thread.start()
    try:
        wait_for(lambda: client.get("/_sim/stats").json["tasks"] == 1)
        # The task is visible upstream while its submit has not been answered yet.
        listed = list_tasks(client).json["data"]
        assert answers.empty()
        assert len(listed) == 1
        query = client.get(f"/api/v1/tasks/{listed[0]['task_id']}", headers=headers())
        assert query.json["output"]["task_status"] != "UNKNOWN"
    finally:
        thread.join(timeout=5)
    resp, elapsed = answers.get_nowait()
    assert resp.status_code == 200
    assert elapsed >= 1
    assert resp.json["output"]["task_id"] == listed[0]["task_id"]
    assert resp.json["request_id"] == listed[0]["request_id"]


def test_sleep_marker_creates_the_task_after_sleeping(client: FlaskClient) -> None:
    app = client.application
    thread = threading.Thread(
        target=lambda: app.test_client().post(T2V, json=body("slow [sleep=0.5]"), headers=headers())
    )
    thread.start()
    try:
        wait_for(lambda: client.get("/_sim/stats").json["submits"] == 1)
        assert client.get("/_sim/stats").json["tasks"] == 0
        assert list_tasks(client).json["total"] == 0
    finally:
        thread.join(timeout=5)
    assert client.get("/_sim/stats").json["tasks"] == 1


def test_answer_after_option_delays_every_submit() -> None:
    client = create_simulator({"answer_after_seconds": 0.3}).test_client()
    started = time.time()
    submit(client)
    answered = time.time()
    assert answered - started >= 0.3
    created = client.get("/_sim/stats").json["task_list"][0]["created"]
    assert created <= answered - 0.3
    # A marker sets this submit's delay, zero included.
    started = time.monotonic()
    submit(client, prompt="quick [answer-after=0]")
    assert time.monotonic() - started < 0.3


def test_answer_after_flag() -> None:
    assert parse_args([]).answer_after == 0
    assert parse_args(["--answer-after", "1.5"]).answer_after == 1.5


def test_stats_list_tasks_and_submits_by_prompt() -> None:
    client = create_simulator().test_client()
    long_key = "sk-0123456789abcdef"
    before = time.time()
    first = client.post(T2V, json=body("same"), headers=headers(long_key)).json
    client.post(T2V, json=body("same"), headers=headers(KEY))
    client.post(KF2V, json={"model": "wan2.2-kf2v-flash", "input": {}}, headers=headers())
    client.post(T2V, json=body("refused [moderate]"), headers=headers())
    client.post(T2V, json=body("same"), headers=headers(key=None))

    stats = client.get("/_sim/stats").json
    assert stats["submits"] == 5
    assert stats["tasks"] == 3
    assert stats["submits_by_prompt"] == {"same": 2, "": 1}
    task_list = stats["task_list"]
    assert [set(entry) for entry in task_list] == [
        {"task_id", "owner_hint", "model", "prompt", "input", "path", "created"}
    ] * 3
    assert [(e["owner_hint"], e["model"], e["prompt"]) for e in task_list] == [
        ("abcdef", "wan2.5-t2v-preview", "same"),
        ("k-good", "wan2.5-t2v-preview", "same"),
        ("k-good", "wan2.2-kf2v-flash", ""),
    ]
    assert task_list[0]["task_id"] == first["output"]["task_id"]
    assert len({e["task_id"] for e in task_list}) == 3
    assert before <= task_list[0]["created"] <= task_list[1]["created"] <= time.time()

    client.post("/_sim/reset")
    stats = client.get("/_sim/stats").json
    assert (stats["task_list"], stats["submits_by_prompt"]) == ([], {})


FACE_DETECT = "/api/v1/services/aigc/image2video/face-detect"
AA_DETECT = "/api/v1/services/aigc/image2video/aa-detect"


def test_checks_answer_at_once_and_refuse_the_async_header(client: FlaskClient) -> None:
    check = {"model": "emo-detect-v1", "input": {"image_url": "https://e.com/face.png"}}

    face = client.post(FACE_DETECT, json=check, headers=headers(async_=None))
    body_check = client.post(AA_DETECT + "/", json=check, headers=headers(async_=None))
    rejected = {**check, "input": {"image_url": "https://e.com/[reject].png"}}
    failed = client.post(FACE_DETECT, json=rejected, headers=headers(async_=None))
    refused = client.post(FACE_DETECT, json=check, headers=headers())

    assert face.status_code == 200
    assert face.json["output"]["check_pass"] is True
    assert face.json["usage"] == {"image_count": 1}
    assert body_check.json["output"]["bodystyle"] == "full"
    assert failed.json["output"]["check_pass"] is False
    assert (refused.status_code, refused.json["code"]) == (403, "AccessDenied")
    assert client.post(FACE_DETECT, json=check).status_code == 401
    stats = client.get("/_sim/stats").json
    assert stats["checks"] == 5
    assert stats["tasks"] == 0
    assert client.post(T2V + "/", json=body(), headers=headers()).status_code == 200


def test_uploads_resolve_only_with_the_header_for_the_key_and_model(client: FlaskClient) -> None:
    got = client.get(
        "/api/v1/uploads?action=getPolicy&model=wan2.5-i2v-preview", headers=headers()
    ).json["data"]
    form = {
        "OSSAccessKeyId": got["oss_access_key_id"],
        "Signature": got["signature"],
        "policy": got["policy"],
        "key": f"{got['upload_dir']}/cat.png",
        "x-oss-object-acl": got["x_oss_object_acl"],
        "x-oss-forbid-overwrite": got["x_oss_forbid_overwrite"],
        "success_action_status": "200",
    }
    path = got["upload_host"].removeprefix("http://localhost")
    forged = client.post(
        path, data={**form, "Signature": "forged", "file": (io.BytesIO(b"x"), "a")}
    )
    uploaded = client.post(path, data={**form, "file": (io.BytesIO(b"png"), "cat.png")})
    assert forged.status_code == 403
    assert uploaded.status_code == 200

    def submit(key: str, model: str, resolve: bool) -> Any:
        body = {"model": model, "input": {"prompt": "p", "img_url": f"oss://{form['key']}"}}
        extra = {"X-DashScope-OssResourceResolve": "enable"} if resolve else {}
        return client.post(T2V, json=body, headers={**headers(key), **extra})

    assert submit(KEY, "wan2.5-i2v-preview", True).status_code == 200
    for key, model, resolve in (
        (KEY, "wan2.5-i2v-preview", False),
        (OTHER_KEY, "wan2.5-i2v-preview", True),
        (KEY, "wan2.5-t2v-preview", True),
    ):
        answer = submit(key, model, resolve)
        assert (answer.status_code, answer.json["code"]) == (400, "InvalidParameter")
