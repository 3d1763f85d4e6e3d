"""Submitting tasks: validation, model access, forwarding unchanged, recording before answering."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.store.tables import tasks
from app.upstream import USER_AGENT
from tests.conftest import (
    INTL,
    INTL_UPSTREAM_KEY,
    KF2V_PATH,
    PRIMARY,
    PRIMARY_UPSTREAM_KEY,
    SUBMIT_PATH,
    bearer,
    new_key,
)

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"


def accepted(task_id: str = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9") -> dict[str, Any]:
    """Return DashScope's answer to an accepted submit."""
    return {
        "request_id": "4909100c-7b5a-9f92-bfe5-cb34b6fd0a3a",
        "output": {"task_id": task_id, "task_status": "PENDING"},
    }


def submit_body(**parameters: Any) -> dict[str, Any]:
    """Return a submit body the way the 1.x SDK builds it."""
    return {
        "model": "wan2.5-t2v-preview",
        "input": {"prompt": "a cat", "extend_prompt": True, "function": "video-synthesis"},
        "parameters": parameters,
    }


def stored_tasks(app: Flask) -> list[Any]:
    """Return every task row in the store."""
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(tasks)).all()


def test_submit_forwards_body_unchanged_with_channel_key(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted())
    # Odd spacing, key order and unknown fields must reach DashScope byte for byte.
    raw = (
        b'{"input": {"prompt": "a cat", "media": [{"type": "first_frame", "url": "u"}],'
        b' "brand_new_field": [1, 2]},  "model": "wan2.5-t2v-preview",'
        b' "parameters": {"seed": 7, "future_knob": {"x": 1}}}'
    )
    response = client.post(
        SUBMIT_PATH, data=raw, headers={**bearer(api_key), "Content-Type": "application/json"}
    )

    assert response.status_code == 200
    assert response.json == accepted()
    sent = upstream.calls[0].request
    assert sent.body == raw
    assert sent.headers["Authorization"] == f"Bearer {PRIMARY_UPSTREAM_KEY}"
    assert sent.headers["X-DashScope-Async"] == "enable"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["User-Agent"] == USER_AGENT
    assert api_key not in json.dumps(dict(sent.headers))


def test_submit_records_the_task_before_answering(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted("task-1"))

    response = client.post(SUBMIT_PATH, json=submit_body(), headers=bearer(api_key))

    assert response.status_code == 200
    [row] = stored_tasks(app)
    assert (row.task_id, row.channel, row.model, row.status) == (
        "task-1",
        "primary",
        "wan2.5-t2v-preview",
        "PENDING",
    )
    assert json.loads(row.upstream_body) == accepted("task-1")


def test_kf2v_submit_goes_to_the_image2video_service(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{PRIMARY}/api/v1/services/aigc/image2video/video-synthesis", json=accepted())
    body = {
        "model": "wanx2.1-kf2v-plus",
        "input": {"first_frame_url": "https://x/a.png", "last_frame_url": "https://x/b.png"},
    }

    response = client.post(KF2V_PATH, json=body, headers=bearer(api_key))

    assert response.status_code == 200
    assert json.loads(upstream.calls[0].request.body) == body


def test_submit_uses_the_channel_that_serves_the_model(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{INTL}/api/v1/services/aigc/video-generation/video-synthesis", json=accepted())
    body = {"model": "wan2.2-t2v-plus", "input": {"prompt": "p"}}

    assert client.post(SUBMIT_PATH, json=body, headers=bearer(api_key)).status_code == 200
    assert upstream.calls[0].request.headers["Authorization"] == f"Bearer {INTL_UPSTREAM_KEY}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parameters": {"duration": "5"}}, "parameters.duration: Not a valid integer."),
        ({"parameters": {"duration": 5.0}}, "parameters.duration: Not a valid integer."),
        ({"parameters": {"duration": True}}, "parameters.duration: Not a valid integer."),
        ({"parameters": {"prompt_extend": "yes"}}, "parameters.prompt_extend: Not a valid"),
        ({"parameters": {"watermark": 1}}, "parameters.watermark: Not a valid boolean."),
        ({"parameters": {"seed": -1}}, "parameters.seed: Must be greater than or equal to 0"),
        ({"parameters": {"seed": 2**31}}, "parameters.seed: Must be greater than or equal"),
        ({"parameters": {"resolution": 720}}, "parameters.resolution: Not a valid string."),
        ({"parameters": "fast"}, "parameters: Invalid input type."),
        ({"input": "a cat"}, "input: Invalid input type."),
        ({"input": {"prompt": ["a", "cat"]}}, "input.prompt: Not a valid string."),
        ({"input": {"ref_images_url": "https://x"}}, "input.ref_images_url: Not a valid list."),
        ({"input": {"media": [{"type": 3}]}}, "input.media[0].type: Not a valid string."),
        ({"model": 42}, "model: Not a valid string."),
    ],
)
def test_invalid_fields_are_rejected_by_path_and_never_forwarded(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    change: dict[str, Any],
    message: str,
) -> None:
    body = {**submit_body(), **change}

    response = client.post(SUBMIT_PATH, json=body, headers=bearer(api_key))

    assert response.status_code == 400
    assert response.json["code"] == "InvalidParameter"
    assert response.json["message"].startswith(message)
    assert len(upstream.calls) == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "InvalidParameter"),
        (b"[1, 2]", "InvalidParameter"),
        (b"", "InvalidParameter"),
        (b'{"input": {"prompt": "p"}}', "BadRequest.EmptyModel"),
        (b'{"model": "", "input": {"prompt": "p"}}', "BadRequest.EmptyModel"),
        (b'{"model": "wan2.5-t2v-preview"}', "BadRequest.EmptyInput"),
        (b'{"model": "wan2.5-t2v-preview", "input": null}', "BadRequest.EmptyInput"),
    ],
)
def test_malformed_bodies_get_native_errors(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock, body: bytes, code: str
) -> None:
    response = client.post(SUBMIT_PATH, data=body, headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (400, code)
    assert len(upstream.calls) == 0


def nested(depth: int, innermost: Any = None) -> Any:
    """Return `innermost` inside `depth` alternating arrays and objects."""
    value = innermost
    for level in range(depth):
        value = [value] if level % 2 else {"x": value}
    return value


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 2**20,  # 1 MiB: past the interpreter's stack
        b'{"model": "wan2.5-t2v-preview", "input": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        json.dumps({**submit_body(), "extra": nested(64)}).encode(),  # 1 + 64 levels
    ],
    ids=["1-MiB-of-brackets", "5000-deep-inside-input", "65-levels"],
)
def test_bodies_nested_too_deeply_are_400_without_a_traceback(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    response = client.post(SUBMIT_PATH, data=body, headers=bearer(api_key))

    assert response.status_code == 400
    assert response.json["code"] == "InvalidParameter"
    assert response.json["message"] == (
        "The request body nests arrays and objects deeper than 64 levels."
    )
    assert len(upstream.calls) == 0
    assert not [record for record in caplog.records if record.exc_info]


def test_a_body_nested_64_levels_deep_is_forwarded(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted())
    body = json.dumps({**submit_body(), "extra": nested(63, 0)}).encode()  # 1 + 63 levels

    response = client.post(SUBMIT_PATH, data=body, headers=bearer(api_key))

    assert response.status_code == 200
    assert upstream.calls[0].request.body == body


def test_sdk_defaults_and_nulls_are_accepted(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted())
    body = submit_body(duration=5, prompt_extend=True, seed=0, size="1280*720")
    body["input"]["negative_prompt"] = None

    assert client.post(SUBMIT_PATH, json=body, headers=bearer(api_key)).status_code == 200


@pytest.mark.parametrize(
    "model",
    ["wan-nonexistent", "wan-unserved", "wan-unpriced"],
    ids=["unknown", "priced-but-no-channel", "served-but-no-price"],
)
def test_models_not_offered_are_model_not_found(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock, model: str
) -> None:
    body = {**submit_body(), "model": model}

    response = client.post(SUBMIT_PATH, json=body, headers=bearer(api_key))

    assert response.status_code == 400
    assert response.json["code"] == "model_not_found"
    assert model in response.json["message"]


def test_key_allowlist_limits_models(
    app: Flask, client: FlaskClient, upstream: responses.RequestsMock
) -> None:
    key = new_key(app, "acme", models=["wan2.2-t2v-plus"])
    upstream.post(f"{INTL}/api/v1/services/aigc/video-generation/video-synthesis", json=accepted())

    refused = client.post(SUBMIT_PATH, json=submit_body(), headers=bearer(key))
    allowed = client.post(
        SUBMIT_PATH, json={**submit_body(), "model": "wan2.2-t2v-plus"}, headers=bearer(key)
    )

    assert (refused.status_code, refused.json["code"]) == (400, "model_not_found")
    assert allowed.status_code == 200


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (400, {"request_id": "r", "code": "InvalidParameter", "message": "duration 7 invalid"}),
        (400, {"request_id": "r", "code": "DataInspectionFailed", "message": "inappropriate"}),
        (400, {"request_id": "r", "code": "InvalidURL", "message": "img_url cannot be read"}),
    ],
)
def test_upstream_errors_about_the_request_pass_through(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    status: int,
    answer: dict[str, Any],
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=answer, status=status)

    response = client.post(SUBMIT_PATH, json=submit_body(), headers=bearer(api_key))

    assert (response.status_code, response.json) == (status, answer)
    assert response.headers["X-Request-Id"] == "r"
    assert stored_tasks(app) == []


def test_an_accepted_answer_without_task_id_is_a_gateway_error(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json={"request_id": "r", "output": {}})

    response = client.post(SUBMIT_PATH, json=submit_body(), headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert stored_tasks(app) == []


def test_a_body_over_the_limit_is_413_and_a_10mb_image_passes(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app()
    client, key = app.test_client(), new_key(app)
    upstream.post(UPSTREAM_SUBMIT, json=accepted())
    image = "data:image/png;base64," + "A" * (10 * 1024 * 1024 * 4 // 3)
    big = submit_body()
    big["input"]["img_url"] = image

    passed = client.post(SUBMIT_PATH, json=big, headers=bearer(key))
    big["input"]["img_url"] = image * 2
    refused = client.post(SUBMIT_PATH, json=big, headers=bearer(key))

    assert passed.status_code == 200
    assert len(upstream.calls[0].request.body) > 13 * 1024 * 1024
    assert (refused.status_code, refused.json["code"]) == (413, "BadRequest.TooLarge")
