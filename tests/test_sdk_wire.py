"""What the official SDKs put on the wire: trailing slashes, both list shapes, extra headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import KF2V_PATH, PRIMARY, SUBMIT_PATH, bearer

TASKS = "/alibailian/api/v1/tasks"
UPSTREAM = f"{PRIMARY}/api/v1"


def accept(upstream: responses.RequestsMock, group: str, task_id: str) -> None:
    """Have DashScope accept one submit on a group's video-synthesis path."""
    upstream.post(
        f"{UPSTREAM}/services/aigc/{group}/video-synthesis",
        json={"request_id": "s", "output": {"task_id": task_id, "task_status": "PENDING"}},
    )


def body(model: str = "wan2.5-t2v-preview", **input_: Any) -> dict[str, Any]:
    """Return a submit body."""
    return {"model": model, "input": {"prompt": "p", **input_}}


@pytest.mark.parametrize("slash", ["", "/"])
def test_every_route_answers_with_and_without_a_trailing_slash(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock, slash: str
) -> None:
    accept(upstream, "video-generation", "t-1")
    submitted = client.post(SUBMIT_PATH + slash, json=body(), headers=bearer(api_key))
    assert submitted.status_code == 200, submitted.json
    accept(upstream, "image2video", "t-2")
    kf2v = client.post(KF2V_PATH + slash, json=body("wanx2.1-kf2v-plus"), headers=bearer(api_key))
    assert kf2v.status_code == 200, kf2v.json

    running = {"request_id": "q", "output": {"task_id": "t-1", "task_status": "PENDING"}}
    upstream.get(f"{UPSTREAM}/tasks/t-1", json=running)
    queried = client.get(f"{TASKS}/t-1{slash}", headers=bearer(api_key))
    assert (queried.status_code, queried.json["output"]["task_id"]) == (200, "t-1")

    upstream.post(f"{UPSTREAM}/tasks/t-1/cancel", json={"request_id": "c"})
    canceled = client.post(f"{TASKS}/t-1/cancel{slash}", headers=bearer(api_key))
    assert canceled.status_code == 200, canceled.json

    listed = client.get(f"{TASKS}{slash}?page_size=5", headers=bearer(api_key))
    assert (listed.status_code, listed.json["total"]) == (200, 2)


def test_the_list_carries_data_for_sdk_1_and_tasks_for_sdk_2(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    accept(upstream, "video-generation", "t-1")
    accept(upstream, "video-generation", "t-2")
    for _ in range(2):
        client.post(SUBMIT_PATH, json=body(), headers=bearer(api_key))
    done = {
        "request_id": "q",
        "output": {
            "task_id": "t-1",
            "task_status": "SUCCEEDED",
            "submit_time": "2025-09-25 19:07:28.590",
            "scheduled_time": "2025-09-25 19:07:28.637",
            "end_time": "2025-09-25 19:12:02.118",
        },
    }
    upstream.get(f"{UPSTREAM}/tasks/t-1", json=done)
    client.get(f"{TASKS}/t-1", headers=bearer(api_key))

    page = client.get(TASKS, headers=bearer(api_key)).json

    assert [entry["task_id"] for entry in page["data"]] == ["t-2", "t-1"]
    assert [entry["task_id"] for entry in page["tasks"]] == ["t-2", "t-1"]
    assert isinstance(page["data"][1]["gmt_create"], int)
    pending, succeeded = page["tasks"]
    # The times DashScope gave, as a query answers them; the gateway's own where it gave none.
    assert {k: succeeded[k] for k in ("submit_time", "scheduled_time", "end_time")} == {
        k: done["output"][k] for k in ("submit_time", "scheduled_time", "end_time")
    }
    assert succeeded["task_status"] == "SUCCEEDED"
    assert pending["task_status"] == "PENDING"
    assert isinstance(pending["submit_time"], str)
    assert len(pending["submit_time"]) == len("2025-09-25 19:07:28.590")
    assert "end_time" not in pending


def test_the_list_filter_takes_suspended(client: FlaskClient, api_key: str) -> None:
    page = client.get(f"{TASKS}?status=SUSPENDED", headers=bearer(api_key))
    assert (page.status_code, page.json["total"], page.json["tasks"]) == (200, 0, [])


def test_the_submit_header_for_oss_inputs_is_forwarded_and_set_for_oss_urls(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    policy = {"request_id": "p", "data": {"upload_dir": "sim/acme/1", "policy": "x"}}
    upstream.get(f"{UPSTREAM}/uploads", json=policy)
    got = client.get(
        "/alibailian/api/v1/uploads?action=getPolicy&model=wan2.5-t2v-preview",
        headers=bearer(api_key),
    )
    assert (got.status_code, got.json) == (200, policy)
    for task_id in ("t-1", "t-2", "t-3"):
        accept(upstream, "video-generation", task_id)
    header = {"X-DashScope-OssResourceResolve": "enable"}
    client.post(SUBMIT_PATH, json=body(), headers={**bearer(api_key), **header})
    client.post(SUBMIT_PATH, json=body(), headers=bearer(api_key))
    oss = body(media=[{"type": "img", "url": "oss://sim/acme/1/a.png"}])
    assert client.post(SUBMIT_PATH, json=oss, headers=bearer(api_key)).status_code == 200

    sent = [c.request.headers.get("X-DashScope-OssResourceResolve") for c in upstream.calls[1:]]
    assert sent == ["enable", None, "enable"]


def test_duplicate_keys_anywhere_in_a_submit_are_refused_by_name(
    client: FlaskClient, api_key: str
) -> None:
    cases = {
        "model": b'{"model": "wan2.5-t2v-preview", "model": "wan2.2-t2v-plus", "input": {}}',
        "prompt": b'{"model": "wan2.5-t2v-preview", "input": {"prompt": "a", "prompt": "b"}}',
        "url": b'{"model": "m", "input": {"media": [{"url": "a", "type": "x", "url": "b"}]}}',
    }
    for key, raw in cases.items():
        response = client.post(
            SUBMIT_PATH, data=raw, headers={**bearer(api_key), "Content-Type": "application/json"}
        )
        assert (response.status_code, response.json["code"]) == (400, "InvalidParameter")
        assert json.dumps(key) in response.json["message"], response.json
