"""Every error the gateway decides comes out in DashScope's one envelope."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient

from app.store import revoke_key
from tests.conftest import PRIMARY, SUBMIT_PATH, bearer, new_key

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
GOOD_BODY = {"model": "wan2.5-t2v-preview", "input": {"prompt": "p"}}


def no_upstream(_upstream: responses.RequestsMock) -> None:
    """Register nothing: the request must not reach DashScope."""


CASES: list[Any] = [
    # (id, method, path, kwargs, key, upstream setup, status, code, message start)
    (
        "no-key",
        "post",
        SUBMIT_PATH,
        {"json": GOOD_BODY},
        None,
        no_upstream,
        401,
        "InvalidApiKey",
        "No API-key provided.",
    ),
    (
        "empty-bearer",
        "get",
        "/alibailian/api/v1/tasks/t",
        {},
        "",
        no_upstream,
        401,
        "InvalidApiKey",
        "No API-key provided.",
    ),
    (
        "bad-key",
        "get",
        "/alibailian/api/v1/tasks/t",
        {},
        "sk-wrong",
        no_upstream,
        401,
        "InvalidApiKey",
        "Invalid API-key provided.",
    ),
    (
        "bad-json",
        "post",
        SUBMIT_PATH,
        {"data": b"{"},
        "good",
        no_upstream,
        400,
        "InvalidParameter",
        "The request body is not valid JSON.",
    ),
    (
        "wrong-type",
        "post",
        SUBMIT_PATH,
        {"json": {**GOOD_BODY, "parameters": {"duration": "5"}}},
        "good",
        no_upstream,
        400,
        "InvalidParameter",
        "parameters.duration: ",
    ),
    (
        "empty-model",
        "post",
        SUBMIT_PATH,
        {"json": {"input": {}}},
        "good",
        no_upstream,
        400,
        "BadRequest.EmptyModel",
        "Required parameter",
    ),
    (
        "empty-input",
        "post",
        SUBMIT_PATH,
        {"json": {"model": "m"}},
        "good",
        no_upstream,
        400,
        "BadRequest.EmptyInput",
        "Required parameter",
    ),
    (
        "too-large",
        "post",
        SUBMIT_PATH,
        {"data": b"x" * (21 * 1024 * 1024)},
        "good",
        no_upstream,
        413,
        "BadRequest.TooLarge",
        "",
    ),
    (
        "model-not-found",
        "post",
        SUBMIT_PATH,
        {"json": {**GOOD_BODY, "model": "nope"}},
        "good",
        no_upstream,
        400,
        "model_not_found",
        "The model `nope`",
    ),
    (
        "task-not-exist",
        "get",
        "/alibailian/api/v1/tasks/nope",
        {},
        "good",
        no_upstream,
        400,
        "task_not_exist",
        "task_not_exist",
    ),
    (
        "route-404",
        "get",
        "/alibailian/api/v1/nothing-here",
        {},
        "good",
        no_upstream,
        404,
        "NotFound",
        "",
    ),
    ("root-404", "get", "/", {}, None, no_upstream, 404, "NotFound", ""),
    (
        "method-405",
        "delete",
        "/alibailian/api/v1/tasks/t",
        {},
        "good",
        no_upstream,
        405,
        "MethodNotAllowed",
        "",
    ),
    ("submit-405", "get", SUBMIT_PATH, {}, "good", no_upstream, 405, "MethodNotAllowed", ""),
    (
        "upstream-timeout",
        "post",
        SUBMIT_PATH,
        {"json": GOOD_BODY},
        "good",
        lambda up: up.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout()),
        504,
        "RequestTimeOut",
        "",
    ),
    (
        "upstream-html",
        "post",
        SUBMIT_PATH,
        {"json": GOOD_BODY},
        "good",
        lambda up: up.post(UPSTREAM_SUBMIT, status=200, body="<html>"),
        503,
        "ServiceUnavailable",
        "",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "key", "setup", "status", "code", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_errors_use_the_native_envelope(
    app: Flask,
    client: FlaskClient,
    upstream: responses.RequestsMock,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    key: str | None,
    setup: Any,
    status: int,
    code: str,
    message: str,
) -> None:
    setup(upstream)
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {new_key(app) if key == 'good' else key}".strip()}

    response = getattr(client, method)(path, headers=headers, **kwargs)

    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert response.json["code"] == code
    assert response.json["message"].startswith(message)
    assert response.json["request_id"] == response.headers["X-Request-Id"]
    assert set(response.json) <= {"request_id", "code", "message", "data"}


def test_options_on_every_route_is_a_native_405_with_allow(app: Flask, client: FlaskClient) -> None:
    rules = list(app.url_map.iter_rules())
    assert len(rules) > 5
    urls = app.url_map.bind("gateway.test")
    for rule in rules:
        # A service's rule names its group and function in its defaults.
        values = {"task_id": "t", **(rule.defaults or {})}
        path = urls.build(rule.endpoint, {name: values[name] for name in rule.arguments})

        response = client.options(path)

        assert response.status_code == 405, rule.rule
        assert response.mimetype == "application/json"
        assert response.json["code"] == "MethodNotAllowed"
        assert response.json["request_id"] == response.headers["X-Request-Id"]
        allowed = set(response.headers["Allow"].split(", "))
        assert allowed == set(rule.methods or ()) - {"OPTIONS"}, rule.rule
        assert allowed
        assert "OPTIONS" not in allowed


def test_a_revoked_key_is_refused(app: Flask, client: FlaskClient) -> None:
    key = new_key(app)
    revoke_key(app.extensions["gateway"].engine, key)

    response = client.get("/alibailian/api/v1/tasks/t", headers=bearer(key))

    assert (response.status_code, response.json["code"]) == (401, "InvalidApiKey")


def test_an_unexpected_error_is_a_native_500_without_details(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-in-a-bug-0123456789"

    def buggy() -> str:
        raise RuntimeError("a bug")

    # A route with a bug in it: what every unforeseen exception must come out as.
    app.add_url_rule("/alibailian/api/v1/buggy", view_func=buggy)

    response = app.test_client().get("/alibailian/api/v1/buggy", headers=bearer(secret))

    assert (response.status_code, response.json["code"]) == (500, "InternalError")
    assert response.json["message"] == "An internal error occurred."
    assert "unhandled error" in caplog.text
    assert secret not in caplog.text


def test_a_database_gone_under_a_running_gateway_is_a_native_503(
    make_app: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "vanishing"
    folder.mkdir()
    app = make_app(GATEWAY_DATABASE_URL=f"sqlite:///{folder / 'db.sqlite3'}")
    key = new_key(app)
    app.extensions["gateway"].engine.dispose()
    shutil.rmtree(folder)

    response = app.test_client().get("/alibailian/api/v1/tasks/t", headers=bearer(key))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert "database error: OperationalError" in caplog.text
    assert key not in caplog.text
