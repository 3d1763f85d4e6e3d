"""Channel choice and safe failover on submit: never resend what may have created a task."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from urllib3.exceptions import MaxRetryError, NewConnectionError

from app.channels import (
    AUTH_COOLDOWN,
    BASE_COOLDOWN,
    FAILING_CALLS,
    FAILING_WINDOW,
    ChannelPool,
)
from app.config import Channel
from tests.conftest import SUBMIT_PATH, bearer, new_key

A, B, C = "https://a.test", "https://b.test", "https://c.test"
SERVICE = "/api/v1/services/aigc/video-generation/video-synthesis"
MODEL = "wan2.5-t2v-preview"

FAILOVER_CONFIG = f"""
[upstream]
connect_timeout = 1
read_timeout = 2

[[channels]]
name = "a"
base_url = "{A}"
api_key_env = "KEY_A"
models = ["{MODEL}"]
priority = 10

[[channels]]
name = "b"
base_url = "{B}"
api_key_env = "KEY_B"
models = ["{MODEL}"]
priority = 5

[[channels]]
name = "c"
base_url = "{C}"
api_key_env = "KEY_C"
models = ["{MODEL}"]

[models."{MODEL}".price_per_second]
"480P" = 0.3
"""
KEYS = {"KEY_A": "sk-up-a", "KEY_B": "sk-up-b", "KEY_C": "sk-up-c"}
ACCEPTED = {"request_id": "r", "output": {"task_id": "t-1", "task_status": "PENDING"}}


def refused(url: str) -> requests.ConnectionError:
    """Return the error requests raises when nothing listens at the address."""
    cause = NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(MaxRetryError(None, url, cause))  # type: ignore[arg-type]


@pytest.fixture
def failover_app(make_app: Any) -> Flask:
    """Return an app whose channels are tried in the order a, b, c (priorities 10, 5, 0)."""
    return make_app(FAILOVER_CONFIG, **KEYS)


def submit(app: Flask) -> Any:
    """Submit one task with a fresh key and return the response."""
    body = {"model": MODEL, "input": {"prompt": "p"}}
    return app.test_client().post(SUBMIT_PATH, json=body, headers=bearer(new_key(app)))


def hosts(upstream: responses.RequestsMock) -> list[str]:
    """Return the upstream origins called, in order."""
    return [call.request.url.split("/api/")[0] for call in upstream.calls]


@pytest.mark.parametrize(
    "failure",
    [
        {"body": refused(A)},
        {"status": 429, "json": {"request_id": "r", "code": "Throttling", "message": "m"}},
        {"status": 429, "body": "<html><body>429 Too Many Requests</body></html>"},
        {"status": 500, "json": {"request_id": "r", "code": "InternalError", "message": "m"}},
        {"status": 503, "json": {"request_id": "r", "code": "ServiceUnavailable", "message": ""}},
        {"status": 401, "json": {"request_id": "r", "code": "InvalidApiKey", "message": "m"}},
        {"status": 403, "json": {"request_id": "r", "code": "AccessDenied", "message": "m"}},
    ],
    ids=["refused", "429", "429-html", "500", "503", "channel-key-401", "channel-key-403"],
)
def test_submit_fails_over_when_nothing_was_created(
    failover_app: Flask, upstream: responses.RequestsMock, failure: dict[str, Any]
) -> None:
    upstream.post(A + SERVICE, **failure)
    upstream.post(B + SERVICE, json=ACCEPTED)

    response = submit(failover_app)

    assert (response.status_code, response.json) == (200, ACCEPTED)
    assert hosts(upstream) == [A, B]


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        ({"body": requests.ReadTimeout("read timed out")}, 504, "RequestTimeOut"),
        (
            {"body": requests.ConnectionError("connection reset after send")},
            503,
            "ServiceUnavailable",
        ),
    ],
    ids=["read-timeout", "lost-after-send"],
)
def test_submit_never_resends_what_may_have_created_a_task(
    failover_app: Flask,
    upstream: responses.RequestsMock,
    failure: dict[str, Any],
    status: int,
    code: str,
) -> None:
    upstream.post(A + SERVICE, **failure)

    response = submit(failover_app)

    assert (response.status_code, response.json["code"]) == (status, code)
    assert hosts(upstream) == [A]


def test_lower_priority_is_used_only_when_the_top_tier_fails(
    failover_app: Flask, upstream: responses.RequestsMock
) -> None:
    upstream.post(A + SERVICE, body=refused(A))
    upstream.post(B + SERVICE, status=500, json={"request_id": "r", "code": "InternalError"})
    upstream.post(C + SERVICE, json=ACCEPTED)

    response = submit(failover_app)

    assert response.status_code == 200
    assert hosts(upstream) == [A, B, C]


def test_all_channels_throttled_passes_429_through(
    failover_app: Flask, upstream: responses.RequestsMock
) -> None:
    throttled = {"request_id": "r", "code": "Throttling.RateQuota", "message": "slow down"}
    for origin in (A, B, C):
        upstream.post(origin + SERVICE, status=429, json=throttled)

    response = submit(failover_app)

    assert (response.status_code, response.json) == (429, throttled)


@pytest.mark.parametrize(
    "answers",
    [
        ["<html>429 Too Many Requests</html>"] * 3,
        ["", "Too Many Requests", "[]"],
        # JSON objects, none of them DashScope's error: relayed, they would read as one.
        ["{}", '{"foo": 1}', '{"request_id": "r", "message": "no code"}'],
        [{"request_id": "r", "code": "Throttling", "message": "m"}, "<html>", "<html>"],
    ],
    ids=["html-everywhere", "empty-text-and-array", "json-not-dashscopes", "json-first"],
)
def test_a_429_without_dashscopes_json_stays_a_429_and_cools_the_model_down(
    failover_app: Flask, upstream: responses.RequestsMock, answers: list[Any]
) -> None:
    for origin, answer in zip((A, B, C), answers, strict=True):
        kind = "json" if isinstance(answer, dict) else "body"
        upstream.post(origin + SERVICE, status=429, **{kind: answer})

    response = submit(failover_app)
    again = submit(failover_app)  # every channel sits this model out now: none is asked

    assert response.status_code == 429
    assert response.mimetype == "application/json"
    if isinstance(answers[0], dict):  # DashScope's own answer wins over the gateway's words
        assert response.json == answers[0]
    else:
        assert response.json["code"] == "Throttling"
        assert response.json["request_id"] == response.headers["X-Request-Id"]
        assert set(response.json) == {"request_id", "code", "message"}
    assert hosts(upstream) == [A, B, C]
    assert (again.status_code, again.json["code"]) == (503, "model_not_found")
    pool = failover_app.extensions["gateway"].pool
    assert all(pool.is_cooling(channel, MODEL) for channel in pool.channels)
    assert not any(pool.is_cooling(channel, "another-model") for channel in pool.channels)


def test_all_channels_down_is_503_then_cooling_channels_are_not_retried(
    failover_app: Flask, upstream: responses.RequestsMock
) -> None:
    for origin in (A, B, C):
        upstream.post(origin + SERVICE, body=refused(origin))

    first = submit(failover_app)
    second = submit(failover_app)

    assert (first.status_code, first.json["code"]) == (503, "ServiceUnavailable")
    assert (second.status_code, second.json["code"]) == (503, "model_not_found")
    assert "temporarily unavailable" in second.json["message"]
    assert len(upstream.calls) == 3  # a dead channel costs one attempt, not one per request


def test_a_channel_key_refusal_is_logged_for_the_operator_without_the_key(
    failover_app: Flask, upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = {"request_id": "r", "code": "InvalidApiKey", "message": "Invalid API-key provided."}
    for origin in (A, B, C):
        upstream.post(origin + SERVICE, status=401, json=refusal)

    response = submit(failover_app)

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    assert "fix the channel's key" in caplog.text
    assert not any(secret in caplog.text for secret in KEYS.values())


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def channel(name: str, priority: int = 0, weight: int = 1, models: str = MODEL) -> Channel:
    """Return a channel serving the test model."""
    return Channel(name, f"https://{name}.test", "k", frozenset([models]), None, priority, weight)


def test_weights_spread_choices_within_a_tier() -> None:
    pool = ChannelPool(
        [channel("heavy", weight=3), channel("light", weight=1)], rng=random.Random(7)
    )

    firsts = Counter(pool.candidates(MODEL)[0].name for _ in range(4000))

    assert 0.70 < firsts["heavy"] / 4000 < 0.80


def test_cooldown_grows_with_failures_and_resets_on_success() -> None:
    clock = FakeClock()
    only = channel("only")
    pool = ChannelPool([only], clock=clock)

    assert pool.report_failure(only) == BASE_COOLDOWN
    assert pool.candidates(MODEL) == []
    clock.now += BASE_COOLDOWN + 0.01
    assert pool.candidates(MODEL) == [only]
    assert pool.report_failure(only) == BASE_COOLDOWN * 2
    pool.report_success(only)
    assert pool.report_failure(only) == BASE_COOLDOWN
    assert pool.report_failure(only, auth=True) == AUTH_COOLDOWN


def test_candidates_only_serve_the_model_high_priority_first() -> None:
    pool = ChannelPool(
        [channel("low", priority=0), channel("other", priority=9, models="x"), channel("high", 5)]
    )

    assert [c.name for c in pool.candidates(MODEL)] == ["high", "low"]


def test_throttling_cools_down_only_the_throttled_model() -> None:
    clock = FakeClock()
    both = Channel("both", "https://both.test", "k", frozenset([MODEL, "other"]), None, 0, 1)
    pool = ChannelPool([both], clock=clock)

    pool.report_failure(both, throttled_model=MODEL)

    assert pool.candidates(MODEL) == []
    assert pool.candidates("other") == [both]
    pool.report_failure(both)
    assert pool.candidates("other") == []


def test_a_channel_is_failing_after_three_failed_calls_in_a_row_recently() -> None:
    clock = FakeClock()
    a, b = channel("a"), channel("b")
    pool = ChannelPool([a, b], clock=clock)

    pool.report_failure(a)
    pool.record_call(a, failed=True)
    assert pool.failing() == []  # two failures could be chance
    pool.report_failure(a, auth=True)  # cools `a` down for AUTH_COOLDOWN
    assert pool.failing() == ["a"]
    clock.now += FAILING_WINDOW + 1
    assert pool.failing() == ["a"]  # not called since, because it still sits out
    clock.now += AUTH_COOLDOWN
    assert pool.failing() == []  # nothing known for a long while
    pool.record_call(a, failed=True)
    assert pool.failing() == ["a"]  # the next call failed too
    pool.record_call(a, failed=False)
    assert pool.failing() == []


def test_a_success_or_a_throttled_call_breaks_a_run_of_failures() -> None:
    clock = FakeClock()
    a = channel("a")
    pool = ChannelPool([a], clock=clock)
    for ending in (
        lambda: pool.report_success(a, MODEL),
        lambda: pool.report_failure(a, throttled_model=MODEL),  # the channel answered
        lambda: pool.record_call(a, failed=False),
    ):
        for _ in range(FAILING_CALLS - 1):
            pool.record_call(a, failed=True)
        ending()
        pool.record_call(a, failed=True)
        assert pool.failing() == []
        pool.record_call(a, failed=False)
