"""What the gateway keeps in memory: key lookups briefly, final tasks for good."""

from __future__ import annotations

import json
import time
from typing import Any

import responses
from flask import Flask
from sqlalchemy import delete, select

from app.store import revoke_key
from app.store.tables import tasks
from tests.conftest import BASE_CONFIG, PRIMARY, SUBMIT_PATH, bearer, new_key

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_TASK = f"{PRIMARY}/api/v1/tasks/{TASK_ID}"


def with_server(**settings: Any) -> str:
    """Return the base config with a [server] section."""
    lines = "\n".join(f"{name} = {value}" for name, value in settings.items())
    return BASE_CONFIG + f"\n[server]\n{lines}\n"


def submit(app: Flask, key: str, upstream: responses.RequestsMock) -> None:
    """Submit TASK_ID through the gateway."""
    upstream.post(
        f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis",
        json={"request_id": "s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}},
    )
    body = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}
    assert app.test_client().post(SUBMIT_PATH, json=body, headers=bearer(key)).status_code == 200


def query(app: Flask, key: str) -> Any:
    """Query TASK_ID through the gateway."""
    return app.test_client().get(f"/alibailian/api/v1/tasks/{TASK_ID}", headers=bearer(key))


def stored_row(app: Flask) -> Any:
    """Return TASK_ID's row."""
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(tasks).where(tasks.c.task_id == TASK_ID)).first()


def test_a_revoked_key_stops_working_within_the_key_cache_time(make_app: Any) -> None:
    app = make_app(with_server(key_cache_seconds=0.3))
    key = new_key(app)
    assert query(app, key).json["code"] == "task_not_exist"  # authenticated, now cached

    revoke_key(app.extensions["gateway"].engine, key)
    time.sleep(0.4)

    assert query(app, key).json["code"] == "InvalidApiKey"


def test_without_a_key_cache_revocation_is_immediate(make_app: Any) -> None:
    app = make_app(with_server(key_cache_seconds=0))
    key = new_key(app)
    assert query(app, key).json["code"] == "task_not_exist"

    revoke_key(app.extensions["gateway"].engine, key)

    assert query(app, key).json["code"] == "InvalidApiKey"


def test_final_tasks_are_served_from_memory_but_only_to_their_account(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(app, api_key, upstream)
    done = {"request_id": "q", "output": {"task_id": TASK_ID, "task_status": "SUCCEEDED"}}
    upstream.get(UPSTREAM_TASK, json=done)
    assert query(app, api_key).json["output"]["task_status"] == "SUCCEEDED"
    assert query(app, api_key).json["output"]["task_status"] == "SUCCEEDED"  # cached now
    with app.extensions["gateway"].engine.begin() as conn:
        conn.execute(delete(tasks))  # the database no longer knows it; the cache does

    from_memory = query(app, api_key)
    stranger = query(app, new_key(app, "someone-else"))

    assert from_memory.json["output"]["task_status"] == "SUCCEEDED"
    assert (stranger.status_code, stranger.json["code"]) == (400, "task_not_exist")


def test_a_refresh_that_repeats_the_stored_answer_writes_nothing(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(app, api_key, upstream)
    running = {"output": {"task_id": TASK_ID, "task_status": "RUNNING", "submit_time": "t"}}
    upstream.get(UPSTREAM_TASK, json={"request_id": "first", **running})
    upstream.get(UPSTREAM_TASK, json={"request_id": "second", **running})

    first, second = query(app, api_key), query(app, api_key)

    assert (first.json["request_id"], second.json["request_id"]) == ("first", "second")
    assert json.loads(stored_row(app).upstream_body)["request_id"] == "first"
    assert stored_row(app).status == "RUNNING"


def test_a_refresh_that_changes_after_repeats_is_stored(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit(app, api_key, upstream)
    running = {"output": {"task_id": TASK_ID, "task_status": "RUNNING", "submit_time": "t"}}
    done = {
        "output": {**running["output"], "task_status": "SUCCEEDED", "video_url": "https://v"},
        "usage": {"duration": 5},
    }
    for request_id, answer in (("r1", running), ("r2", running), ("r3", running), ("d", done)):
        upstream.get(UPSTREAM_TASK, json={"request_id": request_id, **answer})

    statuses = [query(app, api_key).json["output"]["task_status"] for _ in range(4)]

    assert statuses == ["RUNNING"] * 3 + ["SUCCEEDED"]
    stored = json.loads(stored_row(app).upstream_body)
    assert (stored["request_id"], stored["usage"]) == ("d", {"duration": 5})
    assert stored_row(app).status == "SUCCEEDED"
