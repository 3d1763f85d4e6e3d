"""The OpenAPI document: valid, complete, and its examples are what the gateway really does."""

from __future__ import annotations

import ast
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient
from marshmallow import Schema
from openapi_spec_validator import validate

from app.openapi import API_PREFIX, openapi_document
from app.schemas import (
    CancelResponseSchema,
    CheckResponseSchema,
    ErrorSchema,
    PolicyResponseSchema,
    SubmitResponseSchema,
    TaskListResponseSchema,
    TaskNotExistSchema,
    TaskResponseSchema,
    video_synthesis_request_schema,
)
from tests.conftest import PRIMARY, bearer, new_key

OPENAPI_PATH = f"{API_PREFIX}/openapi.json"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Documentation-only schemas, by the component name apispec gives them.
RESPONSE_SCHEMAS: dict[str, type[Schema]] = {
    "SubmitResponse": SubmitResponseSchema,
    "CheckResponse": CheckResponseSchema,
    "PolicyResponse": PolicyResponseSchema,
    "TaskResponse": TaskResponseSchema,
    "CancelResponse": CancelResponseSchema,
    "TaskListResponse": TaskListResponseSchema,
    "Error": ErrorSchema,
    "TaskNotExist": TaskNotExistSchema,
}
SUBMIT = "/services/aigc/video-generation/video-synthesis"
VALID_KEY = "<a fresh key of the app>"
RULE_VARIABLE = re.compile(r"<(?:(\w+)(?:\((.*?)\))?:)?(\w+)>")


@pytest.fixture
def document(client: FlaskClient) -> dict[str, Any]:
    """Return the document as the app serves it, to a client without a key."""
    response = client.get(OPENAPI_PATH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.json


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield every documented (path, method, operation)."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def documented_responses(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield every documented (operation id, status, response), shared responses resolved."""
    for _, _, operation in operations(document):
        for status, response in operation["responses"].items():
            ref = response.get("$ref")
            if ref:
                response = document["components"]["responses"][ref.rsplit("/", 1)[-1]]
            yield operation["operationId"], status, response


def request_examples(document: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Return every documented request example as (path, example name, body)."""
    return [
        (path, name, example["value"])
        for path, _, operation in operations(document)
        if "requestBody" in operation
        for name, example in operation["requestBody"]["content"]["application/json"][
            "examples"
        ].items()
    ]


def served_routes(app: Flask) -> set[tuple[str, str]]:
    """Return every (method, OpenAPI path) the app serves under the prefix."""
    served = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(f"{API_PREFIX}/"):
            continue
        for path in expand_rule(rule.rule.removeprefix(API_PREFIX)):
            served |= {(method.lower(), path) for method in rule.methods - {"HEAD", "OPTIONS"}}
    return served


def expand_rule(rule: str) -> list[str]:
    """Turn a Werkzeug rule into OpenAPI paths: one per `any(...)` choice, `{name}` elsewhere."""
    choices: list[list[str]] = []
    for converter, arguments, name in RULE_VARIABLE.findall(rule):
        if converter == "any":
            choices.append(list(ast.literal_eval(f"({arguments},)")))
        else:
            choices.append([f"{{{name}}}"])
    template = RULE_VARIABLE.sub("{}", rule)
    return [template.format(*combination) for combination in itertools.product(*choices)]


def offering(models: set[str]) -> str:
    """Return a config whose one channel serves and prices every given model (every tier)."""
    prices = "".join(
        f'\n[models."{model}".price_per_second]\n"480P" = 0.3\n"720P" = 0.5\n"1080P" = 1\n'
        for model in models
    )
    return f"""
[[channels]]
name = "primary"
base_url = "{PRIMARY}"
api_key_env = "PRIMARY_UPSTREAM_KEY"
models = {json.dumps(sorted(models))}
{prices}"""


def accept(_request: Any) -> tuple[int, dict[str, str], str]:
    """Answer a submit as DashScope does, with a new task id each time."""
    task = {"task_id": str(uuid.uuid4()), "task_status": "PENDING"}
    return 200, {}, json.dumps({"request_id": str(uuid.uuid4()), "output": task})


def test_document_is_served_without_a_key_and_is_valid_openapi(
    client: FlaskClient, document: dict[str, Any]
) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")
    assert document["servers"] == [{"url": API_PREFIX, "description": "This gateway"}]
    scheme = document["components"]["securitySchemes"]["gatewayKey"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    assert document["security"] == [{"gatewayKey": []}]
    assert document["paths"]["/openapi.json"]["get"]["security"] == []
    # A bad key does not matter either: the document is public.
    assert client.get(OPENAPI_PATH, headers=bearer("sk-wrong")).status_code == 200


def test_document_is_built_once_per_app(app: Flask, document: dict[str, Any]) -> None:
    assert openapi_document(app) is openapi_document(app)
    assert openapi_document(app) == document


def test_every_route_served_under_the_prefix_is_documented(
    app: Flask, document: dict[str, Any]
) -> None:
    documented = {(method, path) for path, method, _ in operations(document)}

    assert documented == served_routes(app)
    assert ("post", "/services/aigc/video-generation/video-synthesis") in documented
    assert ("post", "/services/aigc/image2video/video-synthesis") in documented
    assert ("get", "/tasks/{task_id}") in documented


def test_request_schemas_allow_unknown_fields(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("VideoSynthesisRequest", "VideoSynthesisInput", "VideoSynthesisParameters"):
        assert schemas[name]["additionalProperties"] is True, name


def test_documented_request_examples_pass_the_request_schema(document: dict[str, Any]) -> None:
    examples = request_examples(document)

    assert {"text-to-video", "image-to-video", "first-last-frame"} <= {n for _, n, _ in examples}
    for path, name, body in examples:
        assert video_synthesis_request_schema.validate(body) == {}, (path, name)


def test_documented_request_examples_are_accepted_by_the_gateway(
    document: dict[str, Any], make_app: Callable[..., Flask], upstream: responses.RequestsMock
) -> None:
    examples = request_examples(document)
    app = make_app(offering({body["model"] for _, _, body in examples}))
    client = app.test_client()
    key = new_key(app)
    for path in {path for path, _, _ in examples}:
        upstream.add_callback(responses.POST, f"{PRIMARY}/api/v1{path}", callback=accept)

    try:
        for number, (path, name, body) in enumerate(examples):
            response = client.post(f"{API_PREFIX}{path}", json=body, headers=bearer(key))

            assert response.status_code == 200, (path, name, response.json)
            assert json.loads(upstream.calls[number].request.body) == body, (path, name)
    finally:
        app.extensions["gateway"].engine.dispose()


def test_documented_error_examples_carry_the_envelope(document: dict[str, Any]) -> None:
    statuses = set()
    for operation_id, status, response in documented_responses(document):
        if int(status) < 400:
            continue
        statuses.add(int(status))
        examples = response["content"]["application/json"]["examples"]
        assert examples, (operation_id, status)
        for name, example in examples.items():
            envelope = example["value"]
            for field in ("request_id", "code", "message"):
                assert isinstance(envelope[field], str), (operation_id, status, name, field)

    assert {400, 401, 413, 429, 503, 504} <= statuses


def test_documented_response_examples_match_their_schemas(document: dict[str, Any]) -> None:
    checked = 0
    for operation_id, status, response in documented_responses(document):
        content = response["content"]["application/json"]
        ref = content["schema"].get("$ref")
        if ref is None:
            continue
        schema = RESPONSE_SCHEMAS[ref.rsplit("/", 1)[-1]]()
        for name, example in content.get("examples", {}).items():
            assert schema.validate(example["value"]) == {}, (operation_id, status, name)
            checked += 1

    assert checked >= 20


# (operation id, status, documented example, path, body, key) of a real request.
ERROR_CASES: list[tuple[str, str, str, str, dict[str, Any] | None, str | None]] = [
    ("submitVideoSynthesis", "400", "empty-model", SUBMIT, {"input": {}}, VALID_KEY),
    ("submitVideoSynthesis", "400", "empty-input", SUBMIT, {"model": "m"}, VALID_KEY),
    (
        "submitVideoSynthesis",
        "400",
        "invalid-parameter",
        SUBMIT,
        {"model": "m", "input": {}, "parameters": {"duration": "5"}},
        VALID_KEY,
    ),
    (
        "submitVideoSynthesis",
        "400",
        "model-not-found",
        SUBMIT,
        {"model": "wan9-t2v", "input": {}},
        VALID_KEY,
    ),
    ("submitVideoSynthesis", "401", "no-key", SUBMIT, {}, None),
    ("getTask", "401", "invalid-key", "/tasks/t", None, "sk-unknown"),
    ("getTask", "400", "task-not-exist", "/tasks/t", None, VALID_KEY),
    ("cancelTask", "400", "task-not-exist", "/tasks/t/cancel", None, VALID_KEY),
    ("listTasks", "400", "invalid-parameter", "/tasks?page_size=0", None, VALID_KEY),
]


@pytest.mark.parametrize(
    ("operation_id", "status", "example", "path", "body", "key"),
    [pytest.param(*case, id=f"{case[0]}-{case[2]}") for case in ERROR_CASES],
)
def test_documented_errors_are_what_the_gateway_answers(
    app: Flask,
    client: FlaskClient,
    document: dict[str, Any],
    operation_id: str,
    status: str,
    example: str,
    path: str,
    body: dict[str, Any] | None,
    key: str | None,
) -> None:
    method = next(m for _, m, op in operations(document) if op["operationId"] == operation_id)
    documented = next(
        response["content"]["application/json"]["examples"][example]["value"]
        for op_id, code, response in documented_responses(document)
        if (op_id, code) == (operation_id, status)
    )
    headers = {} if key is None else bearer(new_key(app) if key == VALID_KEY else key)

    answer = client.open(f"{API_PREFIX}{path}", method=method, headers=headers, json=body)

    assert answer.status_code == int(status)
    assert {**answer.json, "request_id": ""} == {**documented, "request_id": ""}
