"""An upstream that answers oddly (encodings, header values, sizes, drips) never costs a task."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from app.reconcile import Reconciler
from app.store.tables import ledger, submissions, tasks
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


UPSTREAM_LIST = f"{PRIMARY}/api/v1/tasks"
# Past the reconciler's grace for answers on their way; past the adoption window too.
LATER, MUCH_LATER = timedelta(minutes=1), timedelta(minutes=10)


def reconciler(app: Flask, ahead: timedelta) -> Reconciler:
    """Return a reconciler whose clock runs `ahead` of the gateway's and that never sleeps."""
    gateway = app.extensions["gateway"]
    return Reconciler(gateway, clock=lambda: gateway.clock() + ahead, sleep=lambda _s: None)


def listing(*items: tuple[str, datetime]) -> dict[str, Any]:
    """Return DashScope's task list answer holding (task id, creation time) items."""
    data = [
        {
            "task_id": task_id,
            "status": "RUNNING",
            "model_name": SUBMIT_BODY["model"],
            "gmt_create": int(created.replace(tzinfo=UTC).timestamp() * 1000),
        }
        for task_id, created in items
    ]
    return {"request_id": "r", "total": len(data), "page_no": 1, "page_size": 100, "data": data}


def submissions_of(app: Flask) -> list[Any]:
    """Return every submission row."""
    with app.extensions["gateway"].engine.connect() as conn:
        return list(conn.execute(select(submissions)))


def ledger_rows(app: Flask) -> list[Any]:
    """Return every ledger row, oldest first."""
    with app.extensions["gateway"].engine.connect() as conn:
        return list(conn.execute(select(ledger).order_by(ledger.c.id)))


# Ids no task query could name: too long, a path, a space, a header break, a NUL, not ASCII.
BAD_TASK_IDS = ["x" * 65, "x" * 100, "a/b", "a b", "a\r\nb", "a\x00b", "tâche", "a.b"]


@pytest.mark.parametrize("task_id", BAD_TASK_IDS)
def test_a_submit_answer_whose_task_id_dashscope_never_makes_is_a_broken_answer(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    task_id: str,
) -> None:
    answer = {"request_id": "up-submit", "output": {"task_id": task_id, "task_status": "PENDING"}}
    upstream.post(UPSTREAM_SUBMIT, json=answer)

    response = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))

    # What any broken answer to a submit gets: the task may exist, so do not resend.
    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert response.headers["x-should-retry"] == "false"
    assert stored_bodies(app) == []
    [submission] = submissions_of(app)
    assert (submission.state, submission.task_id) == ("in_flight", None)
    assert app.extensions["gateway"].journal.lines() == 0
    assert not [record for record in caplog.records if record.exc_info]
    # The reconciler lists the channel's tasks: the one it cannot query is never adopted.
    created = submission.sent_at + timedelta(seconds=1)
    upstream.get(UPSTREAM_LIST, json=listing((task_id, created)))
    assert reconciler(app, LATER).run_pass().adopted == 0
    late = reconciler(app, MUCH_LATER).run_pass()
    assert (late.adopted, late.errors) == (0, [])
    assert stored_bodies(app) == []
    assert [row.state for row in submissions_of(app)] == ["not_created"]
    assert [row.kind for row in ledger_rows(app)] == ["reserve", "release"]


@pytest.mark.parametrize("task_id", ["x" * 100, "a/b", "a\r\nb", "a\x00b"])
def test_the_reconciler_never_adopts_a_listed_task_id_dashscope_never_makes(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    task_id: str,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout("slow"))
    assert client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key)).status_code == 504
    [submission] = submissions_of(app)
    created = submission.sent_at + timedelta(seconds=1)
    # The good id comes later than the bad one: it is the only one that may be adopted.
    upstream.get(
        UPSTREAM_LIST,
        json=listing((task_id, created), (TASK_ID, created + timedelta(seconds=1))),
    )
    upstream.get(UPSTREAM_TASK, json=SUCCEEDED)

    report = reconciler(app, LATER).run_pass()

    assert (report.adopted, report.errors) == (1, [])
    with app.extensions["gateway"].engine.connect() as conn:
        assert list(conn.execute(select(tasks.c.task_id)).scalars()) == [TASK_ID]


@pytest.mark.parametrize("task_id", ["x" * 100, "a/b", "a\r\nb", "a\x00b"])
def test_a_journal_line_whose_task_id_dashscope_never_makes_is_set_aside(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    task_id: str,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout("slow"))
    assert client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key)).status_code == 504
    [submission] = submissions_of(app)
    journal = app.extensions["gateway"].journal
    journal.append(
        {
            "submission_id": submission.id,
            "task_id": task_id,
            "status": "PENDING",
            "upstream_body": json.dumps({"output": {"task_id": task_id}}),
            "accepted_at": submission.sent_at.isoformat(),
            "account_id": submission.account_id,
            "key_id": submission.key_id,
            "channel": "primary",
            "model": SUBMIT_BODY["model"],
        }
    )

    report = reconciler(app, timedelta(0)).run_pass()

    assert report.replayed == 0
    assert [line for line in report.lines if line.startswith("journal line rejected")]
    assert journal.lines() == 0
    assert Path(journal.rejected_path).read_text().count("\n") == 1
    assert stored_bodies(app) == []
    assert [row.state for row in submissions_of(app)] == ["in_flight"]  # left to the listing


# Statuses no task column holds (32 characters) or DashScope writes (a short upper-case word).
BAD_TASK_STATUSES = ["R" * 33, "R" * 100, "running", "RUN NING", "PENDING\r\n", "PEND\x00", ""]


@pytest.mark.parametrize("status", BAD_TASK_STATUSES)
def test_a_task_status_dashscope_never_writes_is_never_stored(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    status: str,
) -> None:
    odd = {"request_id": "r", "output": {"task_id": TASK_ID, "task_status": status}}
    upstream.post(UPSTREAM_SUBMIT, json=odd)
    upstream.get(UPSTREAM_TASK, json=odd)

    submitted = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))
    queried = client.get(TASK_URL, headers=bearer(api_key))

    # The task exists (its id is DashScope's): recorded as the submit's answer would have it.
    assert (submitted.status_code, submitted.json) == (200, odd)
    assert (queried.status_code, queried.headers.get("X-Gateway-Stale")) == (200, "upstream_error")
    with app.extensions["gateway"].engine.connect() as conn:
        assert list(conn.execute(select(tasks.c.status)).scalars()) == ["PENDING"]
    assert app.extensions["gateway"].journal.lines() == 0
    assert not [record for record in caplog.records if record.exc_info]


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"foo": 1}', b'{"request_id": "r", "message": "m"}', b'{"code": 5, "message": "m"}'],
    ids=["empty", "foreign", "no-code", "code-not-text"],
)
def test_a_429_whose_json_is_not_dashscopes_error_is_a_native_throttling_429(
    app: Flask,
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    body: bytes,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.post(UPSTREAM_SUBMIT, status=429, body=body)
    upstream.post(f"{UPSTREAM_TASK}/cancel", status=429, body=body)
    assert client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key)).status_code == 200

    throttled = client.post(SUBMIT_PATH, json=SUBMIT_BODY, headers=bearer(api_key))
    cancel = client.post(f"{TASK_URL}/cancel", headers=bearer(api_key))

    for response in (throttled, cancel):
        assert (response.status_code, response.mimetype) == (429, "application/json")
        assert response.json["code"] == "Throttling"
        assert set(response.json) == {"request_id", "code", "message"}
        assert response.json["request_id"] == response.headers["X-Request-Id"]
