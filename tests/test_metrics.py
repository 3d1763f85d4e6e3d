"""GET /metrics: Prometheus text, every label value from a fixed set, counts that add up."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app.billing import ledger
from app.billing.ledger import Limit
from app.observability.metrics import label_from, method_label, task_status_label
from app.reconcile import Reconciler
from tests.conftest import BASE_CONFIG, INTL, PRIMARY, SUBMIT_PATH, bearer, new_key
from tests.test_failover import refused

TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"
UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_TASK = f"{PRIMARY}/api/v1/tasks/{TASK_ID}"
TASK_PATH = f"/alibailian/api/v1/tasks/{TASK_ID}"
T2V = "wan2.5-t2v-preview"
ACCEPTED = {"request_id": "up-s", "output": {"task_id": TASK_ID, "task_status": "PENDING"}}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: FlaskClient) -> Samples:
    """Return every sample /metrics shows, keyed by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


class Meter:
    """Reads how much a sample grew since the meter was made (the registry is process-wide)."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client
        self.before = scrape(client)
        self.after: Samples = {}

    def read(self) -> Meter:
        """Scrape again."""
        self.after = scrape(self.client)
        return self

    def delta(self, name: str, **labels: str) -> float:
        """Return the growth of one sample."""
        key = (name, frozenset(labels.items()))
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


def submit(client: FlaskClient, key: str, model: str = T2V) -> int:
    """Submit a task through the gateway and return the HTTP status."""
    body = {"model": model, "input": {"prompt": "p"}}
    return client.post(SUBMIT_PATH, json=body, headers=bearer(key)).status_code


def test_metrics_are_prometheus_text_without_a_key(client: FlaskClient) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    text = response.get_data(as_text=True)
    for name in (
        "bailian_gateway_http_requests_total",
        "bailian_gateway_http_request_duration_seconds",
        "bailian_gateway_upstream_requests_total",
        "bailian_gateway_upstream_request_duration_seconds",
        "bailian_gateway_submits_total",
        "bailian_gateway_task_transitions_total",
        "bailian_gateway_task_queries_total",
        "bailian_gateway_channel_cooldowns_total",
    ):
        assert f"# TYPE {name} " in text


def test_requests_are_counted_by_endpoint_never_by_path(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(UPSTREAM_TASK, json={"request_id": "q", "output": {"task_status": "RUNNING"}})
    meter = Meter(client)

    assert submit(client, api_key) == 200
    assert client.get(TASK_PATH, headers=bearer(api_key)).status_code == 200
    assert client.get("/alibailian/api/v1/tasks/some-other-task").status_code == 401
    assert client.get("/no/such/route/sk-secret-looking").status_code == 404
    assert client.open("/healthz", method="BREW").status_code == 405
    meter.read()

    counted = "bailian_gateway_http_requests_total"
    submit_route = "compat.submit_video_synthesis"
    assert meter.delta(counted, route=submit_route, method="POST", status="200") == 1
    assert meter.delta(counted, route="compat.get_task", method="GET", status="200") == 1
    assert meter.delta(counted, route="compat.get_task", method="GET", status="401") == 1
    assert meter.delta(counted, route="unmatched", method="GET", status="404") == 1
    assert meter.delta(counted, route="unmatched", method="other", status="405") == 1
    timed = "bailian_gateway_http_request_duration_seconds_count"
    assert meter.delta(timed, route="compat.get_task") == 2
    text = client.get("/metrics").get_data(as_text=True)
    for client_chosen in (TASK_ID, "some-other-task", "sk-secret-looking", "BREW"):
        assert client_chosen not in text


@pytest.mark.parametrize(
    ("answer", "client_status", "outcome", "status"),
    [
        ({"json": ACCEPTED}, 200, "ok", "200"),
        (
            {"status": 400, "json": {"request_id": "r", "code": "InvalidParameter"}},
            400,
            "http_error",
            "400",
        ),
        ({"body": refused(UPSTREAM_SUBMIT)}, 503, "unreachable", "none"),
        ({"body": requests.ReadTimeout("slow")}, 504, "timeout", "none"),
        # An answer that came, unusable: its status is known.
        ({"status": 502, "body": "<html>bad gateway</html>"}, 503, "broken", "502"),
        ({"status": 429, "body": "<html>slow down</html>"}, 429, "http_error", "429"),
    ],
    ids=["ok", "http_error", "unreachable", "timeout", "broken", "throttled-html"],
)
def test_upstream_calls_are_counted_by_channel_outcome_and_status(
    client: FlaskClient,
    api_key: str,
    upstream: responses.RequestsMock,
    answer: dict[str, Any],
    client_status: int,
    outcome: str,
    status: str,
) -> None:
    upstream.post(UPSTREAM_SUBMIT, **answer)
    meter = Meter(client)

    assert submit(client, api_key) == client_status
    meter.read()

    call = {"channel": "primary", "operation": "submit", "outcome": outcome}
    assert meter.delta("bailian_gateway_upstream_requests_total", **call, status=status) == 1
    assert meter.delta("bailian_gateway_upstream_request_duration_seconds_count", **call) == 1


def test_task_queries_upstream_are_counted_as_queries(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(UPSTREAM_TASK, json={"request_id": "q", "output": {"task_status": "RUNNING"}})
    assert submit(client, api_key) == 200
    meter = Meter(client)

    assert client.get(TASK_PATH, headers=bearer(api_key)).status_code == 200
    meter.read()

    call = {"channel": "primary", "operation": "query", "outcome": "ok", "status": "200"}
    assert meter.delta("bailian_gateway_upstream_requests_total", **call) == 1


def test_submits_are_counted_by_offered_model_only(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.post(UPSTREAM_SUBMIT, status=429, json={"request_id": "r", "code": "Throttling"})
    meter = Meter(client)

    assert submit(client, api_key) == 200
    assert submit(client, api_key) == 429
    assert submit(client, api_key, "sk-a-client-typed-this-model") == 400
    meter.read()

    assert meter.delta("bailian_gateway_submits_total", model=T2V, status="200") == 1
    assert meter.delta("bailian_gateway_submits_total", model=T2V, status="429") == 1
    assert "sk-a-client-typed-this-model" not in client.get("/metrics").get_data(as_text=True)


def test_transitions_and_the_source_of_each_query_are_counted(
    client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    for status in ("RUNNING", "RUNNING", "SUCCEEDED"):
        upstream.get(UPSTREAM_TASK, json={"request_id": "q", "output": {"task_status": status}})
    meter = Meter(client)

    assert submit(client, api_key) == 200
    for _ in range(4):
        assert client.get(TASK_PATH, headers=bearer(api_key)).status_code == 200
    meter.read()

    moved = "bailian_gateway_task_transitions_total"
    assert meter.delta(moved, from_status="NEW", to_status="PENDING") == 1
    assert meter.delta(moved, from_status="PENDING", to_status="RUNNING") == 1
    assert meter.delta(moved, from_status="RUNNING", to_status="RUNNING") == 0
    assert meter.delta(moved, from_status="RUNNING", to_status="SUCCEEDED") == 1
    answered = "bailian_gateway_task_queries_total"
    assert meter.delta(answered, source="upstream", reason="refreshed") == 3
    assert meter.delta(answered, source="store", reason="final") == 1


def test_queries_inside_the_refresh_interval_or_after_a_failed_refresh_come_from_the_store(
    make_app: Callable[..., Flask], upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("refresh_interval = 0", "refresh_interval = 0.3"))
    client, key = app.test_client(), new_key(app)
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    upstream.get(UPSTREAM_TASK, status=503, json={"request_id": "q", "code": "ServiceUnavailable"})
    meter = Meter(client)

    assert submit(client, key) == 200
    assert client.get(TASK_PATH, headers=bearer(key)).status_code == 200
    upstream.assert_call_count(UPSTREAM_TASK, 0)
    time.sleep(0.35)  # past the refresh interval
    assert client.get(TASK_PATH, headers=bearer(key)).status_code == 200
    meter.read()

    answered = "bailian_gateway_task_queries_total"
    assert meter.delta(answered, source="store", reason="fresh") == 1
    assert meter.delta(answered, source="store", reason="upstream_failed") == 1
    assert meter.delta(answered, source="upstream", reason="refreshed") == 0
    app.extensions["gateway"].engine.dispose()


def test_money_metrics_after_a_refusal_and_a_settlement(
    app: Flask, client: FlaskClient, api_key: str, upstream: responses.RequestsMock
) -> None:
    gateway = app.extensions["gateway"]
    ledger.set_limit(gateway.engine, "acme", Limit(Decimal(2), "month"), gateway.clock())
    upstream.post(UPSTREAM_SUBMIT, json=ACCEPTED)
    running = {"request_id": "q", "output": {"task_id": TASK_ID, "task_status": "RUNNING"}}
    succeeded = {
        "request_id": "q",
        "output": {"task_id": TASK_ID, "task_status": "SUCCEEDED"},
        "usage": {"duration": 4.5, "SR": 480},  # 4.5 s x 0.3 = 1.35
    }
    upstream.get(UPSTREAM_TASK, json=running)  # the first pass's refresh
    upstream.get(UPSTREAM_TASK, json=succeeded)
    reconciler = Reconciler(gateway, sleep=lambda _s: None)
    meter = Meter(client)

    assert submit(client, api_key) == 200  # 5 s at 480P: 1.50 of the 2.00 reserved
    assert submit(client, api_key) == 400  # Arrearage: 0.50 remains
    reconciler.run_pass()
    held = scrape(client)[("bailian_gateway_reservations_outstanding", frozenset())]
    polled = client.get(TASK_PATH, headers=bearer(api_key)).get_json()
    assert polled["output"]["task_status"] == "SUCCEEDED"
    reconciler.run_pass()
    meter.read()

    assert held == 1.5
    assert meter.after[("bailian_gateway_reservations_outstanding", frozenset())] == 0
    assert meter.delta("bailian_gateway_limit_refusals_total", model=T2V) == 1
    assert meter.delta("bailian_gateway_charged_total", model=T2V) == pytest.approx(1.35)


def test_channel_cooldowns_are_counted_by_channel_and_reason(
    make_app: Callable[..., Flask], upstream: responses.RequestsMock
) -> None:
    # Both channels serve the model: the refused one is cooled down, the other takes the submit.
    config = BASE_CONFIG.replace('models = ["wan2.2-t2v-plus"]', f'models = ["{T2V}"]').replace(
        'name = "intl"', 'name = "intl"\npriority = 10'
    )
    app = make_app(config)
    client, key = app.test_client(), new_key(app)
    intl_submit = f"{INTL}/api/v1/services/aigc/video-generation/video-synthesis"
    upstream.post(intl_submit, status=401, json={"request_id": "r", "code": "InvalidApiKey"})
    upstream.post(UPSTREAM_SUBMIT, status=500, json={"request_id": "r", "code": "InternalError"})
    meter = Meter(client)

    assert submit(client, key) == 503
    meter.read()

    cooled = "bailian_gateway_channel_cooldowns_total"
    assert meter.delta(cooled, channel="intl", reason="auth") == 1
    assert meter.delta(cooled, channel="primary", reason="failure") == 1
    app.extensions["gateway"].engine.dispose()


@pytest.mark.parametrize(
    ("value", "label"),
    [("POST", "POST"), ("BREW", "other"), ("post", "other")],
)
def test_methods_outside_the_known_set_are_other(value: str, label: str) -> None:
    assert method_label(value) == label


def test_label_helpers_admit_only_their_sets() -> None:
    assert label_from("wan2.5-t2v-preview", {"wan2.5-t2v-preview"}) == "wan2.5-t2v-preview"
    assert label_from("anything else", {"wan2.5-t2v-preview"}) == "other"
    assert label_from(None, {"x"}) == "other"
    assert task_status_label("SUCCEEDED") == "SUCCEEDED"
    assert task_status_label("SOMETHING_NEW") == "other"


def test_a_second_app_in_the_process_shares_the_registry(
    app: Flask, make_app: Callable[..., Flask]
) -> None:
    # Tests and `flask run` build apps repeatedly: defining metrics twice would raise.
    other = make_app()
    assert other.test_client().get("/metrics").status_code == 200
    other.extensions["gateway"].engine.dispose()
