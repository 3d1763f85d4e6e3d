"""DESIGN.md's error table, row by row, over raw HTTP against the real gunicorn."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from .conftest import (
    API_PREFIX,
    BROKEN_MODEL,
    FAILOVER_MODEL,
    HTTP_TIMEOUT,
    I2V,
    PRICED_UNSERVED_MODEL,
    REFUSED_KEY,
    REFUSED_MODEL,
    SERVED_UNPRICED_MODEL,
    SIM_KEY,
    SIM_SPARE_KEY,
    SLOW_MODEL,
    SLOW_PROMPT,
    SUBMIT_PATH,
    T2V,
    THROTTLED_MODEL,
    UNKNOWN_MODEL,
    UNREACHABLE_MODEL,
    UPSTREAM_SUBMIT_PATH,
    Gateway,
    Keys,
    Simulator,
    assert_native_error,
    bearer,
    query,
    submit,
)

MAX_BODY_BYTES = 20 * 1024 * 1024


def post_raw(gateway: Gateway, data: Any, headers: dict[str, str]) -> requests.Response:
    """POST bytes (or a chunk iterator) to the submit route as they are."""
    return requests.post(
        f"{gateway.url}{SUBMIT_PATH}", data=data, headers=headers, timeout=HTTP_TIMEOUT
    )


def json_headers(key: str) -> dict[str, str]:
    return {**bearer(key), "Content-Type": "application/json"}


def wait_final(gateway: Gateway, key: str, task_id: str) -> dict[str, Any]:
    """Poll the gateway until the task is final (the simulator finishes in about 1 s)."""
    deadline = time.monotonic() + 20
    while True:
        response = query(gateway, key, task_id)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["output"]["task_status"] in {"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"}:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


@pytest.fixture
def nothing_upstream(simulator: Simulator) -> Iterator[None]:
    """Assert the test sent no submit to upstream."""
    before = simulator.stats()["submits"]
    yield
    assert simulator.stats()["submits"] == before, "a rejected request reached upstream"


# --------------------------------------------------------------------------- authentication

ROUTES: list[tuple[str, str]] = [
    ("POST", SUBMIT_PATH),
    ("GET", f"{API_PREFIX}/tasks/{uuid.uuid4()}"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=["submit", "query"])
@pytest.mark.usefixtures("nothing_upstream")
def test_no_authorization_is_401(gateway: Gateway, method: str, path: str) -> None:
    response = requests.request(
        method,
        f"{gateway.url}{path}",
        json={"model": T2V, "input": {"prompt": "x"}},
        timeout=HTTP_TIMEOUT,
    )
    assert_native_error(response, 401, "InvalidApiKey", "No API-key provided.")


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=["submit", "query"])
@pytest.mark.parametrize(
    "authorization",
    [f"Bearer sk-{uuid.uuid4().hex}", "Bearer not-even-a-key", f"sk-{uuid.uuid4().hex}"],
    ids=["unknown", "garbage", "bare-unknown"],
)
@pytest.mark.usefixtures("nothing_upstream")
def test_bad_key_is_401(gateway: Gateway, method: str, path: str, authorization: str) -> None:
    response = requests.request(
        method,
        f"{gateway.url}{path}",
        json={"model": T2V, "input": {"prompt": "x"}},
        headers={"Authorization": authorization},
        timeout=HTTP_TIMEOUT,
    )
    assert_native_error(response, 401, "InvalidApiKey", "Invalid API-key provided.")


@pytest.mark.usefixtures("nothing_upstream")
def test_channel_key_is_not_a_gateway_key(gateway: Gateway) -> None:
    assert_native_error(submit(gateway, SIM_KEY), 401, "InvalidApiKey", "Invalid API-key provided.")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json{", id="not-json"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'[{"model": "wan2.5-t2v-preview"}]', id="json-array"),
        pytest.param(b'"a string"', id="json-string"),
    ],
)
@pytest.mark.usefixtures("nothing_upstream")
def test_body_not_a_json_object_is_invalid_parameter(
    gateway: Gateway, keys: Keys, body: bytes
) -> None:
    assert_native_error(post_raw(gateway, body, json_headers(keys.alice)), 400, "InvalidParameter")


@pytest.mark.parametrize(
    ("change", "path"),
    [
        pytest.param({"parameters": {"duration": "5"}}, "parameters.duration", id="duration-str"),
        pytest.param(
            {"parameters": {"prompt_extend": "yes"}}, "parameters.prompt_extend", id="extend-yes"
        ),
        pytest.param({"parameters": {"watermark": 1}}, "parameters.watermark", id="watermark-1"),
        pytest.param({"parameters": {"seed": -1}}, "parameters.seed", id="seed-negative"),
        pytest.param({"parameters": [5]}, "parameters", id="parameters-array"),
        pytest.param({"input": "a prompt"}, "input", id="input-string"),
        pytest.param({"input": {"prompt": 42}}, "input.prompt", id="prompt-number"),
        pytest.param(
            {"input": {"prompt": "x", "ref_images_url": [1]}},
            "input.ref_images_url[0]",
            id="ref-images-item",
        ),
        pytest.param(
            {"input": {"prompt": "x", "media": [{"type": 3, "url": "u"}]}},
            "input.media[0].type",
            id="media-item-type",
        ),
        pytest.param({"model": 5}, "model", id="model-number"),
    ],
)
@pytest.mark.usefixtures("nothing_upstream")
def test_field_of_the_wrong_type_names_its_path(
    gateway: Gateway, keys: Keys, change: dict[str, Any], path: str
) -> None:
    body = {"model": T2V, "input": {"prompt": "x"}, **change}
    response = post_raw(gateway, json.dumps(body), json_headers(keys.alice))
    error = assert_native_error(response, 400, "InvalidParameter")
    assert error["message"].startswith(f"{path}: "), error


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({"input": {"prompt": "x"}}, "BadRequest.EmptyModel", id="no-model"),
        pytest.param(
            {"model": "", "input": {"prompt": "x"}}, "BadRequest.EmptyModel", id="model-''"
        ),
        pytest.param({"model": None, "input": {}}, "BadRequest.EmptyModel", id="model-null"),
        pytest.param({"model": T2V}, "BadRequest.EmptyInput", id="no-input"),
        pytest.param({"model": T2V, "input": None}, "BadRequest.EmptyInput", id="input-null"),
    ],
)
@pytest.mark.usefixtures("nothing_upstream")
def test_missing_model_or_input(
    gateway: Gateway, keys: Keys, body: dict[str, Any], code: str
) -> None:
    assert_native_error(post_raw(gateway, json.dumps(body), json_headers(keys.alice)), 400, code)


# --------------------------------------------------------------------------- body size


@pytest.mark.usefixtures("nothing_upstream")
def test_body_over_20_mib_is_413(gateway: Gateway, keys: Keys) -> None:
    padding = "x" * MAX_BODY_BYTES
    body = json.dumps({"model": T2V, "input": {"prompt": "x", "padding": padding}})
    assert len(body) > MAX_BODY_BYTES
    response = post_raw(gateway, body.encode(), json_headers(keys.alice))
    assert_native_error(response, 413, "BadRequest.TooLarge")


@pytest.mark.usefixtures("nothing_upstream")
def test_chunked_body_over_20_mib_is_413(gateway: Gateway, keys: Keys) -> None:
    padding = "x" * MAX_BODY_BYTES
    body = json.dumps({"model": T2V, "input": {"prompt": "x", "padding": padding}}).encode()
    chunks = (body[start : start + 2**20] for start in range(0, len(body), 2**20))
    response = post_raw(gateway, chunks, json_headers(keys.alice))  # Transfer-Encoding: chunked
    assert_native_error(response, 413, "BadRequest.TooLarge")


def send_raw(gateway: Gateway, data: bytes) -> bytes:
    """Send bytes as they are on a new connection; return all gunicorn answers until it closes."""
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Return the status, the headers (lower-case names) and the body of one raw HTTP answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


@pytest.mark.usefixtures("nothing_upstream")
@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"10\r\n{}"],
    ids=["bad-chunk-size", "no-chunk-terminator", "cut-short"],
)
def test_a_malformed_chunked_body_is_a_native_400(
    gateway: Gateway, keys: Keys, chunks: bytes
) -> None:
    head = (
        f"POST {SUBMIT_PATH} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {keys.alice}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    log_before = len(gateway.log_text())
    status, headers, body = parse_answer(send_raw(gateway, head.encode() + chunks))
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    envelope = json.loads(body)
    assert envelope["code"] == "InvalidParameter"
    assert envelope["request_id"] == headers["x-request-id"]
    assert set(envelope) == {"request_id", "code", "message"}
    assert "zz" not in envelope["message"]
    assert "Traceback" not in gateway.log_text()[log_before:]


def test_ten_mb_image_as_data_url_is_forwarded(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    image = b"\x89PNG\r\n\x1a\n" + os.urandom(10_000_000 - 8)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"model": I2V, "input": {"prompt": "animate this", "img_url": data_url}}
    raw = json.dumps(body).encode()
    assert 13_000_000 < len(raw) < MAX_BODY_BYTES

    response = post_raw(gateway, raw, json_headers(keys.alice))
    assert response.status_code == 200, response.text[:500]
    task_id = response.json()["output"]["task_id"]
    upstream = simulator.last_submit()
    assert upstream["path"] == UPSTREAM_SUBMIT_PATH
    assert upstream["body"] == body
    assert upstream["headers"]["content-length"] == str(len(raw))
    assert wait_final(gateway, keys.alice, task_id)["output"]["task_status"] == "SUCCEEDED"


# --------------------------------------------------------------------------- model availability


@pytest.mark.parametrize(
    "model",
    [UNKNOWN_MODEL, PRICED_UNSERVED_MODEL, SERVED_UNPRICED_MODEL],
    ids=["unknown", "priced-unserved", "served-unpriced"],
)
@pytest.mark.usefixtures("nothing_upstream")
def test_model_not_offered_is_model_not_found(gateway: Gateway, keys: Keys, model: str) -> None:
    error = assert_native_error(submit(gateway, keys.alice, model), 400, "model_not_found")
    assert model in error["message"]


@pytest.mark.usefixtures("nothing_upstream")
def test_model_outside_the_key_allowlist_is_model_not_found(gateway: Gateway, keys: Keys) -> None:
    excluded = assert_native_error(submit(gateway, keys.limited, I2V), 400, "model_not_found")
    unknown = assert_native_error(
        submit(gateway, keys.limited, UNKNOWN_MODEL), 400, "model_not_found"
    )
    # The same answer as for a model that does not exist, but for the name.
    assert excluded["message"].replace(I2V, "M") == unknown["message"].replace(UNKNOWN_MODEL, "M")


def test_allowlisted_model_is_served(gateway: Gateway, keys: Keys) -> None:
    response = submit(gateway, keys.limited, T2V)
    assert response.status_code == 200, response.text


# --------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/no-such-route"),
        ("GET", f"{API_PREFIX}/no-such-route"),
        ("POST", f"{API_PREFIX}/services/aigc/text2image/video-synthesis"),
        ("GET", f"{API_PREFIX}/tasks/{uuid.uuid4()}/no-such-action"),
        ("GET", "/api/v1/tasks/abc"),  # upstream's path, not the gateway's
    ],
)
def test_unknown_route_is_native_404(gateway: Gateway, keys: Keys, method: str, path: str) -> None:
    response = requests.request(
        method, f"{gateway.url}{path}", headers=bearer(keys.alice), timeout=HTTP_TIMEOUT
    )
    assert_native_error(response, 404, "NotFound")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", SUBMIT_PATH, "POST"),
        ("PUT", SUBMIT_PATH, "POST"),
        ("DELETE", f"{API_PREFIX}/tasks/{uuid.uuid4()}", "GET"),
        ("POST", f"{API_PREFIX}/tasks/{uuid.uuid4()}", "GET"),
        ("OPTIONS", SUBMIT_PATH, "POST"),
        ("OPTIONS", f"{API_PREFIX}/tasks/{uuid.uuid4()}", "GET"),
        ("OPTIONS", f"{API_PREFIX}/tasks", "GET"),
        ("OPTIONS", "/readyz", "GET"),
    ],
)
def test_wrong_method_is_native_405(
    gateway: Gateway, keys: Keys, method: str, path: str, allowed: str
) -> None:
    response = requests.request(
        method, f"{gateway.url}{path}", headers=bearer(keys.alice), timeout=HTTP_TIMEOUT
    )
    assert_native_error(response, 405, "MethodNotAllowed")
    assert allowed in response.headers["Allow"]
    assert "OPTIONS" not in response.headers["Allow"]


# --------------------------------------------------------------------------- upstream trouble


def test_upstream_read_timeout_is_504(gateway: Gateway, keys: Keys) -> None:
    started = time.monotonic()
    response = submit(gateway, keys.alice, SLOW_MODEL, SLOW_PROMPT)
    assert_native_error(response, 504, "RequestTimeOut")
    assert time.monotonic() - started < 4, "the gateway waited for the slow upstream"


def test_unreachable_channel_is_503(gateway: Gateway, keys: Keys) -> None:
    response = submit(gateway, keys.alice, UNREACHABLE_MODEL)
    assert_native_error(response, 503, "ServiceUnavailable")


def test_upstream_500_on_every_channel_is_503(gateway: Gateway, keys: Keys) -> None:
    response = submit(gateway, keys.alice, BROKEN_MODEL, "[error500] upstream breaks")
    assert_native_error(response, 503, "ServiceUnavailable")


def test_refused_channel_key_is_503_never_401(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    before = simulator.stats()["submits"]
    response = submit(gateway, keys.alice, REFUSED_MODEL)
    assert_native_error(response, 503, "ServiceUnavailable")
    upstream = simulator.last_submit()
    assert upstream["headers"]["authorization"] == f"Bearer {REFUSED_KEY}"

    # The refused channel now sits out, so the model is offered but not usable right now.
    answers = []
    for _ in range(6):
        answer = submit(gateway, keys.alice, REFUSED_MODEL)
        assert answer.status_code == 503, answer.text
        answers.append(assert_native_error(answer, 503, answer.json()["code"]))
    cooling = [a for a in answers if a["code"] == "model_not_found"]
    assert cooling, answers
    assert "temporarily unavailable" in cooling[0]["message"]
    assert {a["code"] for a in answers} <= {"model_not_found", "ServiceUnavailable"}
    # At most one refused submit per gunicorn worker (2) ever reached upstream.
    assert simulator.stats()["submits"] - before <= 2


def test_unreachable_channel_fails_over_to_the_next(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    response = submit(gateway, keys.alice, FAILOVER_MODEL)
    assert response.status_code == 200, response.text
    task_id = response.json()["output"]["task_id"]
    assert simulator.last_submit()["headers"]["authorization"] == f"Bearer {SIM_SPARE_KEY}"
    # Queried on the channel that created it (another key would see UNKNOWN upstream).
    assert wait_final(gateway, keys.alice, task_id)["output"]["task_status"] == "SUCCEEDED"


def test_moderation_error_passes_through(gateway: Gateway, keys: Keys) -> None:
    response = submit(gateway, keys.alice, T2V, "[moderate] something unpleasant")
    body = assert_native_error(
        response,
        400,
        "DataInspectionFailed",
        "Input data may contain inappropriate content.",
    )
    assert set(body) == {"request_id", "code", "message"}
    assert response.headers["X-Request-Id"] == body["request_id"]  # upstream's id


def test_throttling_passes_through(gateway: Gateway, keys: Keys) -> None:
    response = submit(gateway, keys.alice, THROTTLED_MODEL, "[throttle] too fast")
    body = assert_native_error(
        response,
        429,
        "Throttling.RateQuota",
        "Requests rate limit exceeded, please try again later.",
    )
    assert set(body) == {"request_id", "code", "message"}
    assert response.headers["X-Request-Id"] == body["request_id"]


# --------------------------------------------------------------------------- forwarding


def test_submit_adds_async_header_and_channel_key(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    body = {
        "model": T2V,
        "input": {"prompt": "raw client", "brand_new_field": {"nested": [1, None, True]}},
        "parameters": {"duration": 5, "resolution": "720P", "future_param": "x"},
        "top_level_extra": 1,
    }
    response = post_raw(gateway, json.dumps(body), json_headers(keys.alice))
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-Id"] == response.json()["request_id"]
    upstream = simulator.last_submit()
    assert upstream["body"] == body
    assert upstream["headers"]["x-dashscope-async"] == "enable"
    assert upstream["headers"]["authorization"] == f"Bearer {SIM_KEY}"
    assert keys.alice not in json.dumps(upstream["headers"])


def test_data_inspection_header_is_forwarded(
    gateway: Gateway, keys: Keys, simulator: Simulator
) -> None:
    inspection = '{"input": "cip", "output": "cip"}'
    response = requests.post(
        f"{gateway.url}{SUBMIT_PATH}",
        json={"model": T2V, "input": {"prompt": "inspect me"}},
        headers={**bearer(keys.alice), "X-DashScope-DataInspection": inspection},
        timeout=HTTP_TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert simulator.last_submit()["headers"].get("x-dashscope-datainspection") == inspection
