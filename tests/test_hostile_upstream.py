"""An upstream that answers oddly (encodings, header values, sizes, drips) never costs a task."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.store.tables import tasks
from tests.conftest import BASE_CONFIG, PRIMARY, SUBMIT_PATH, bearer, new_key

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_TASK = f"{PRIMARY}/api/v1/tasks/{TASK_ID}"
TASK_URL = f"/alibailian/api/v1/tasks/{TASK_ID}"
SUBMIT_BODY = {"model": "wan2.5-t2v-preview", "input": {"prompt": "猫"}}
ACCEPTED = {"request_id": "up-submit", "output": {"task_id": TASK_ID, "task_status": "PENDING"}}
SUCCEEDED = {
    "request_id": "up-query",
    "output": {"task_id": TASK_ID, "task_status": "SUCCEEDED", "orig_prompt": "猫"},
    "usage": {"duration": 5, "SR": 480, "video_count": 1},
}


def stored_bodies(app: Flask) -> list[str]:
    """Return the upstream body stored for every task."""
    with app.extensions["gateway"].engine.connect() as conn:
        return list(conn.execute(select(tasks.c.upstream_body)).scalars())


@pytest.mark.parametrize(
    "encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"]
)
def test_answers_in_any_json_encoding_are_stored_as_utf8_and_stay_queryable(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    encoding: str,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=json.dumps(ACCEPTED, ensure_ascii=False).encode(encoding))
    upstream.get(UPSTREAM_TASK, body=json.dumps(SUCCEEDED, ensure_ascii=False).encode(encoding))

    submitted = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))
    [stored_at_submit] = stored_bodies(app)
    refreshed = client.get(TASK_URL, headers=bearer(api_key))
    from_store = [client.get(TASK_URL, headers=bearer(api_key)) for _ in range(2)]

    # The client gets UTF-8 JSON, as application/json must be, with what DashScope said.
    assert (submitted.status_code, json.loads(submitted.data.decode("utf-8"))) == (200, ACCEPTED)
    assert json.loads(stored_at_submit) == ACCEPTED
    assert (refreshed.status_code, json.loads(refreshed.data.decode("utf-8"))) == (200, SUCCEEDED)
    [stored] = stored_bodies(app)
    assert not stored.startswith("\ufeff")
    assert json.loads(stored) == SUCCEEDED
    for answer in from_store:
        assert answer.status_code == 200
        assert answer.json["output"] == SUCCEEDED["output"]
        assert answer.json["usage"] == SUCCEEDED["usage"]


def test_a_utf8_answer_is_relayed_byte_for_byte(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    # Spacing and member order as DashScope sent them: only other encodings are re-encoded.
    raw = b'{"output":{"task_status":"PENDING","task_id":"%s"},  "request_id":"r"}' % (
        TASK_ID.encode()
    )
    upstream.post(UPSTREAM_SUBMIT, body=raw)

    response = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))

    assert (response.status_code, response.data) == (200, raw)


@pytest.mark.parametrize(
    "body",
    [
        b"\xef\xbb\xbf\xef\xbb\xbf{}",  # two BOMs: the second is text before the object
        b'{"request_id": "\xff"}',  # not UTF-8
        b'{"request_id": "\xed\xa0\x80"}',  # an encoded lone surrogate: not UTF-8 either
        b"[" * 100_000,  # nested past the interpreter's stack
    ],
    ids=["double-bom", "latin-1", "lone-surrogate", "deep"],
)
def test_an_answer_no_json_decoding_reads_is_a_broken_answer(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=body)

    response = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert stored_bodies(app) == []
    assert not [record for record in caplog.records if record.exc_info]


def test_a_query_answer_with_a_bom_is_stored_without_it(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(UPSTREAM_TASK, body=b"\xef\xbb\xbf" + json.dumps(SUCCEEDED).encode())
    client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))

    answers: list[Any] = [client.get(TASK_URL, headers=bearer(api_key)) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert {answer.json["output"]["task_status"] for answer in answers} == {"SUCCEEDED"}
    assert not answers[0].data.startswith(b"\xef\xbb\xbf")
    assert json.loads(stored_bodies(app)[0]) == SUCCEEDED


@pytest.mark.parametrize(
    ("request_id", "header"),
    [
        ("up-1\r\nSet-Cookie: session=forged", "up-1Set-Cookie:session=forged"),
        ("up-1\nX-Injected: 1", "up-1X-Injected:1"),
        ("up\x00-\x1b[31m-\x7f1", "up-[31m-1"),
        ("请求-1", "-1"),
        ("\r\n", None),
        ("x" * 10_000, "x" * 128),
    ],
    ids=["crlf", "lf", "controls", "non-ascii", "nothing-left", "long"],
)
def test_an_upstream_request_id_is_sanitised_before_headers_and_logs(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    request_id: str,
    header: str | None,
) -> None:
    accepted = {**ACCEPTED, "request_id": request_id}
    upstream.post(UPSTREAM_SUBMIT, json=accepted)
    upstream.get(UPSTREAM_TASK, json={**SUCCEEDED, "request_id": request_id})

    submitted = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))
    queried = client.get(TASK_URL, headers=bearer(api_key))
    again = client.get(TASK_URL, headers=bearer(api_key))

    assert [submitted.status_code, queried.status_code, again.status_code] == [200, 200, 200]
    # The body is DashScope's as it came (JSON escapes the characters); the header is not.
    assert submitted.json == accepted
    for answer in (submitted, queried):
        assert answer.headers["X-Request-Id"] == (header or answer.headers["X-Request-Id"])
        assert "\r" not in answer.headers["X-Request-Id"]
        assert "\n" not in answer.headers["X-Request-Id"]
    if header is None:  # nothing usable: the gateway's own id
        assert submitted.headers["X-Request-Id"] != request_id
    logged = [getattr(r, "upstream_request_id", None) for r in caplog.records]
    assert request_id not in logged
    assert header in logged
    assert len(stored_bodies(app)) == 1


SMALL_CAP_CONFIG = BASE_CONFIG.replace("[upstream]", "[upstream]\nmax_answer_bytes = 4096")
OVERSIZED = {**ACCEPTED, "pad": "x" * 5000}


def test_a_submit_answer_over_max_answer_bytes_is_a_broken_answer(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(SMALL_CAP_CONFIG)
    upstream.post(UPSTREAM_SUBMIT, json=OVERSIZED)

    response = app.test_client().post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(new_key(app)))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert "pad" not in response.json["message"]
    assert stored_bodies(app) == []


def test_a_query_answer_over_max_answer_bytes_is_not_stored(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(SMALL_CAP_CONFIG)
    client, key = app.test_client(), new_key(app)
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(UPSTREAM_TASK, json={**SUCCEEDED, "pad": "x" * 5000})
    client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(key))

    response = client.get(TASK_URL, headers=bearer(key))

    assert (response.status_code, response.json["output"]) == (200, ACCEPTED["output"])
    assert [json.loads(body) for body in stored_bodies(app)] == [ACCEPTED]
