"""Every video service path: async tasks recorded and owned, synchronous checks only forwarded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import func, select

from app.services import SERVICES
from app.store.tables import submissions, tasks
from tests.conftest import BASE_CONFIG, PRIMARY, PRIMARY_UPSTREAM_KEY, bearer, new_key

API = "/alibailian/api/v1"
UPSTREAM = f"{PRIMARY}/api/v1"
CHECK_MODEL = "emo-detect-v1"
TEMPLATE_MODEL = "animate-anyone-template-gen2"
CONFIG = (
    BASE_CONFIG.replace('"wan-unpriced"]', f'"wan-unpriced", "{CHECK_MODEL}", "{TEMPLATE_MODEL}"]')
    + f'\n[models."{TEMPLATE_MODEL}".price_per_second]\n"480P" = 0.1\n'
)
CHECKED = {"request_id": "r-1", "output": {"check_pass": True}, "usage": {"image_count": 1}}


@pytest.fixture
def gateway_app(make_app: Callable[..., Flask]) -> Flask:
    """Return the gateway with a check model (unpriced) and an AnimateAnyone template model."""
    return make_app(CONFIG)


def counts(app: Flask) -> tuple[int, int]:
    """Return how many tasks and submissions the store holds."""
    with app.extensions["gateway"].engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(tasks)).scalar_one(),
            conn.execute(select(func.count()).select_from(submissions)).scalar_one(),
        )


def check_body(model: str = CHECK_MODEL) -> dict[str, Any]:
    """Return a face-detect body."""
    return {"model": model, "input": {"image_url": "https://example.com/face.png"}}


def test_the_table_has_the_async_tasks_and_the_synchronous_checks() -> None:
    table = {(s.group, s.function): s.asynchronous for s in SERVICES}
    assert table == {
        ("video-generation", "video-synthesis"): True,
        ("image2video", "video-synthesis"): True,
        ("image2video", "aa-template-generation"): True,
        ("image2video", "face-detect"): False,
        ("image2video", "aa-detect"): False,
    }


def test_a_synchronous_check_is_forwarded_without_the_async_header_and_not_recorded(
    gateway_app: Flask, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UPSTREAM}/services/aigc/image2video/face-detect", json=CHECKED)
    key = new_key(gateway_app)
    raw = b'{"model": "emo-detect-v1",  "input": {"image_url": "https://e.com/f.png"}}'

    answer = gateway_app.test_client().post(
        f"{API}/services/aigc/image2video/face-detect/",
        data=raw,
        headers={**bearer(key), "Content-Type": "application/json"},
    )

    assert (answer.status_code, answer.json) == (200, CHECKED)
    sent = upstream.calls[0].request
    assert "X-DashScope-Async" not in sent.headers
    assert sent.headers["Authorization"] == f"Bearer {PRIMARY_UPSTREAM_KEY}"
    assert sent.body == raw
    assert counts(gateway_app) == (0, 0)


def test_a_refused_check_passes_through_unchanged(
    gateway_app: Flask, upstream: responses.RequestsMock
) -> None:
    refusal = {"request_id": "r", "code": "InvalidParameter", "message": "no face"}
    upstream.post(f"{UPSTREAM}/services/aigc/image2video/aa-detect", status=400, json=refusal)
    key = new_key(gateway_app)

    answer = gateway_app.test_client().post(
        f"{API}/services/aigc/image2video/aa-detect", json=check_body(), headers=bearer(key)
    )

    assert (answer.status_code, answer.json) == (400, refusal)


def test_a_check_needs_a_served_model_the_key_may_use(gateway_app: Flask) -> None:
    client = gateway_app.test_client()
    limited = new_key(gateway_app, "limited", ["wan2.5-t2v-preview"])
    path = f"{API}/services/aigc/image2video/face-detect"

    for key, model in ((new_key(gateway_app), "no-such-detect"), (limited, CHECK_MODEL)):
        answer = client.post(path, json=check_body(model), headers=bearer(key))
        assert (answer.status_code, answer.json["code"]) == (400, "model_not_found")
    assert client.post(path, json=check_body()).status_code == 401


def test_an_async_image2video_function_is_a_recorded_submit(
    gateway_app: Flask, upstream: responses.RequestsMock
) -> None:
    accepted = {"request_id": "s", "output": {"task_id": "t-aa", "task_status": "PENDING"}}
    upstream.post(f"{UPSTREAM}/services/aigc/image2video/aa-template-generation", json=accepted)
    key = new_key(gateway_app)
    body = {"model": TEMPLATE_MODEL, "input": {"video_url": "https://e.com/dance.mp4"}}

    answer = gateway_app.test_client().post(
        f"{API}/services/aigc/image2video/aa-template-generation", json=body, headers=bearer(key)
    )

    assert answer.status_code == 200, answer.json
    assert upstream.calls[0].request.headers["X-DashScope-Async"] == "enable"
    assert counts(gateway_app) == (1, 1)


@pytest.mark.parametrize(
    "path",
    [
        "services/aigc/image2video/no-such-function",
        "services/aigc/video-generation/face-detect",
        "services/aigc/no-such-group/video-synthesis",
    ],
)
def test_an_unknown_service_is_a_native_404(gateway_app: Flask, path: str) -> None:
    key = new_key(gateway_app)
    answer = gateway_app.test_client().post(f"{API}/{path}", json=check_body(), headers=bearer(key))
    assert (answer.status_code, answer.json["code"]) == (404, "NotFound")
