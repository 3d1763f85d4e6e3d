"""The gateway's OpenAPI 3 document, built with apispec from the marshmallow schemas."""

from __future__ import annotations

from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import fields

from app.errors import ApiError, invalid_api_key, model_not_found, task_not_exist
from app.schemas import (
    CancelResponseSchema,
    CheckResponseSchema,
    ErrorSchema,
    PolicyResponseSchema,
    SubmitResponseSchema,
    TaskListQuerySchema,
    TaskListResponseSchema,
    TaskNotExistSchema,
    TaskResponseSchema,
    VideoSynthesisRequestSchema,
    first_error,
    video_synthesis_request_schema,
)
from app.services import SERVICES

API_PREFIX = "/alibailian/api/v1"
SECURITY_SCHEME = "gatewayKey"
EXAMPLE_REQUEST_ID = "4909100c-7b5a-9f92-bfe5-cb34b6fd0a3a"
EXAMPLE_TASK_ID = "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9"

DESCRIPTION = """\
DashScope's native async video API (Alibaba Cloud Bailian), served by bailian-gateway.
Clients written for DashScope (the `dashscope` SDK or raw HTTP) only change their base URL
to `http://<gateway>/alibailian/api/v1` and their key to a gateway key. Submit bodies are
forwarded to DashScope unchanged, unknown fields included; task ids are DashScope's own.
Errors use DashScope's envelope `{"request_id", "code", "message"}`.
"""

SUBMIT_EXAMPLES: dict[str, dict[str, Any]] = {
    "text-to-video": {
        "summary": "Text to video",
        "value": {
            "model": "wan2.5-t2v-preview",
            "input": {
                "prompt": "A kitten running through a moonlit garden, cinematic lighting",
                "negative_prompt": "blurry, low quality",
            },
            "parameters": {"size": "832*480", "duration": 5, "prompt_extend": True},
        },
    },
    "image-to-video": {
        "summary": "Image to video, from a first frame",
        "value": {
            "model": "wan2.5-i2v-preview",
            "input": {
                "prompt": "The cat turns its head and jumps off the sofa",
                "img_url": "https://example.com/images/cat-on-sofa.png",
            },
            "parameters": {
                "resolution": "720P",
                "duration": 5,
                "prompt_extend": False,
                "watermark": False,
                "audio": True,
                "seed": 12345,
            },
        },
    },
    "sdk-1x": {
        "summary": "As the dashscope SDK 1.x sends it (extra fields are forwarded as they are)",
        "value": {
            "model": "wan2.5-t2v-preview",
            "input": {
                "prompt": "A paper boat drifting down a rainy street",
                "extend_prompt": True,
                "function": "video-synthesis",
            },
            "parameters": {},
        },
    },
}

KF2V_SUBMIT_EXAMPLES: dict[str, dict[str, Any]] = {
    "first-last-frame": {
        "summary": "First and last frame to video (kf2v models)",
        "value": {
            "model": "wanx2.1-kf2v-plus",
            "input": {
                "prompt": "A flower bud slowly opens into a full bloom",
                "first_frame_url": "https://example.com/images/bud.png",
                "last_frame_url": "https://example.com/images/bloom.png",
            },
            "parameters": {"resolution": "720P", "prompt_extend": True},
        },
    },
}


TASK_LIST_EXAMPLE = {
    "request_id": EXAMPLE_REQUEST_ID,
    "total": 1,
    "total_page": 1,
    "page_no": 1,
    "page_size": 10,
    "data": [
        {
            "task_id": EXAMPLE_TASK_ID,
            "status": "SUCCEEDED",
            "model_name": "wan2.5-t2v-preview",
            "api_key_id": "1",
            "gmt_create": 1758798448590,
            "end_time": 1758798722118,
        }
    ],
    "tasks": [
        {
            "task_id": EXAMPLE_TASK_ID,
            "task_status": "SUCCEEDED",
            "model_name": "wan2.5-t2v-preview",
            "api_key_id": "1",
            "submit_time": "2025-09-25 19:07:28.590",
            "scheduled_time": "2025-09-25 19:07:28.637",
            "end_time": "2025-09-25 19:12:02.118",
        }
    ],
}


def error_example(summary: str, error: ApiError) -> dict[str, Any]:
    """Return an example of the error envelope the gateway renders for `error`."""
    return {
        "summary": summary,
        "value": {
            "request_id": EXAMPLE_REQUEST_ID,
            "code": error.code,
            "message": error.message,
            **error.extra,
        },
    }


UNAVAILABLE_EXAMPLE = error_example(
    "No channel reachable",
    ApiError(503, "ServiceUnavailable", "The upstream service is unavailable."),
)
TIMEOUT_EXAMPLE = error_example(
    "Upstream timeout",
    ApiError(504, "RequestTimeOut", "The upstream service did not answer in time."),
)


def openapi_document(app: Flask) -> dict[str, Any]:
    """Return the app's OpenAPI document, building it on first use."""
    document: dict[str, Any] | None = app.extensions.get("openapi")
    if document is None:
        # Two threads racing here build the same dict; the last one wins harmlessly.
        document = app.extensions["openapi"] = build_openapi_document()
    return document


def build_openapi_document() -> dict[str, Any]:
    """Build the OpenAPI document of every route under the compatibility prefix."""
    marshmallow_plugin = MarshmallowPlugin()
    spec = APISpec(
        title="bailian-gateway",
        version=package_version(),
        openapi_version="3.1.0",
        plugins=[marshmallow_plugin],
        info={"description": DESCRIPTION},
        servers=[{"url": API_PREFIX, "description": "This gateway"}],
        security=[{SECURITY_SCHEME: []}],
    )
    assert marshmallow_plugin.converter is not None  # set by APISpec's constructor
    marshmallow_plugin.converter.add_attribute_function(  # type: ignore[no-untyped-call]
        strftime_datetime_properties
    )
    spec.components.security_scheme(
        SECURITY_SCHEME,
        {
            "type": "http",
            "scheme": "bearer",
            "description": "A gateway key (`sk-...`), sent as `Authorization: Bearer <key>`.",
        },
    )
    spec.components.header(
        "RequestId",
        {
            "description": "DashScope's request id when the answer came from upstream, "
            "else the gateway's.",
            "schema": {"type": "string"},
        },
    )
    spec.components.response(
        "Unauthorized",
        error_response(
            "No key, or an unknown or revoked key.",
            {
                "no-key": error_example("No key", invalid_api_key("No API-key provided.")),
                "invalid-key": error_example("Unknown or revoked key", invalid_api_key()),
            },
        ),
    )
    add_submit_paths(spec)
    add_service_paths(spec)
    add_upload_path(spec)
    add_task_paths(spec)
    spec.path(
        path="/openapi.json",
        operations={
            "get": {
                "operationId": "getOpenApiDocument",
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    )
    return spec.to_dict()


def add_submit_paths(spec: APISpec) -> None:
    """Describe the two video-synthesis submit routes."""
    responses = submit_responses()
    spec.path(
        path="/services/aigc/video-generation/video-synthesis",
        operations={
            "post": {
                "operationId": "submitVideoSynthesis",
                "tags": ["video synthesis"],
                "summary": "Submit a video-synthesis task",
                "description": "Text-to-video, image-to-video, VACE editing and effect "
                "templates. The body is checked for the types of the fields the gateway "
                "knows, then forwarded to DashScope unchanged.",
                "requestBody": submit_body(SUBMIT_EXAMPLES),
                "responses": responses,
            }
        },
    )
    spec.path(
        path="/services/aigc/image2video/video-synthesis",
        operations={
            "post": {
                "operationId": "submitFirstLastFrameVideoSynthesis",
                "tags": ["video synthesis"],
                "summary": "Submit a first/last-frame (kf2v) video-synthesis task",
                "description": "The route the dashscope SDK uses for every model whose name "
                "contains `kf2v`; otherwise the same as the video-generation route.",
                "requestBody": submit_body(KF2V_SUBMIT_EXAMPLES),
                "responses": responses,
            }
        },
    )


# One example body for each service path described from the table (app/services.py).
SERVICE_EXAMPLES: dict[str, dict[str, Any]] = {
    "aa-template-generation": {
        "model": "animate-anyone-template-gen2",
        "input": {"video_url": "https://example.com/videos/dance.mp4"},
    },
    "face-detect": {
        "model": "emo-detect-v1",
        "input": {"image_url": "https://example.com/images/portrait.png"},
        "parameters": {"ratio": "1:1"},
    },
    "aa-detect": {
        "model": "animate-anyone-detect-gen2",
        "input": {"image_url": "https://example.com/images/person.png"},
    },
}


def add_service_paths(spec: APISpec) -> None:
    """Describe the other service paths of the table: async tasks and synchronous checks."""
    for service in SERVICES:
        if service.function == "video-synthesis":
            continue  # described above, with their own examples
        example = {
            "example": {"summary": service.serves, "value": SERVICE_EXAMPLES[service.function]}
        }
        if service.asynchronous:
            responses = submit_responses()
            summary, description = "Submit an async task", "Recorded and owned like a submit."
        else:
            checked = {
                "request_id": EXAMPLE_REQUEST_ID,
                "output": {"check_pass": True},
                "usage": {"image_count": 1},
            }
            responses = {
                **submit_responses(),
                "200": json_response(
                    "DashScope's answer, unchanged.",
                    CheckResponseSchema,
                    {"passed": {"value": checked}},
                ),
            }
            summary = "Call a synchronous check"
            description = (
                "Forwarded without `X-DashScope-Async` and answered as DashScope answers it; "
                "nothing is recorded."
            )
        spec.path(
            path=f"/{service.path}",
            operations={
                "post": {
                    "operationId": "".join(
                        part.capitalize() for part in service.path.replace("/", "-").split("-")
                    ),
                    "tags": ["video synthesis"],
                    "summary": f"{summary}: {service.serves}",
                    "description": description,
                    "requestBody": submit_body(example),
                    "responses": responses,
                }
            },
        )


def add_upload_path(spec: APISpec) -> None:
    """Describe getPolicy, the first step of DashScope's upload flow."""
    policy = {
        "request_id": EXAMPLE_REQUEST_ID,
        "data": {
            "policy": "eyJleHBpcmF0aW9uIjog...",
            "signature": "gN5Y...",
            "upload_dir": "dashscope-instant/1a2b/2025-09-25/0385dc79",
            "upload_host": "https://dashscope-file-mgr.oss-cn-beijing.aliyuncs.com",
            "expire_in_seconds": 300,
            "oss_access_key_id": "LTAI...",
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        },
    }
    responses = submit_responses()
    responses["200"] = json_response(
        "DashScope's policy, unchanged: upload the file to `upload_host`, then submit "
        "`oss://{upload_dir}/{filename}` for the same model.",
        PolicyResponseSchema,
        {"policy": {"value": policy}},
    )
    spec.path(
        path="/uploads",
        operations={
            "get": {
                "operationId": "getUploadPolicy",
                "tags": ["uploads"],
                "summary": "Get an upload policy for a model (`action=getPolicy&model=M`)",
                "description": "Asked of the account's channel for the model; the upload "
                "directory is bound to the account, that channel and the model for 48 h.",
                "parameters": [
                    {
                        "in": "query",
                        "name": "action",
                        "required": True,
                        "schema": {"type": "string", "enum": ["getPolicy"]},
                    },
                    {
                        "in": "query",
                        "name": "model",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                ],
                "responses": responses,
            }
        },
    )


def add_task_paths(spec: APISpec) -> None:
    """Describe the task query, cancel and list routes."""
    task_id = {
        "name": "task_id",
        "in": "path",
        "required": True,
        "description": "The task id a submit answered.",
        "schema": {"type": "string"},
    }
    unknown_task = error_example("Unknown, expired or another account's task", task_not_exist())
    spec.path(
        path="/tasks/{task_id}",
        parameters=[task_id],
        operations={
            "get": {
                "operationId": "getTask",
                "tags": ["tasks"],
                "summary": "Query a task of the caller's account",
                "description": "HTTP 200 in every task state. A running task is refreshed "
                "from DashScope at most once per refresh interval; a finished one is served "
                "from the gateway's store.",
                "responses": {
                    "200": json_response("The task.", TaskResponseSchema, task_examples()),
                    "400": json_response(
                        "The task does not exist for this account (identical in every case).",
                        TaskNotExistSchema,
                        {"task-not-exist": unknown_task},
                    ),
                    "401": "Unauthorized",
                },
            }
        },
    )
    spec.path(
        path="/tasks/{task_id}/cancel",
        parameters=[task_id],
        operations={
            "post": {
                "operationId": "cancelTask",
                "tags": ["tasks"],
                "summary": "Cancel a PENDING task of the caller's account",
                "responses": {
                    "200": json_response(
                        "Canceled.",
                        CancelResponseSchema,
                        {"canceled": {"value": {"request_id": EXAMPLE_REQUEST_ID}}},
                    ),
                    "400": error_response(
                        "The task is not PENDING, or does not exist for this account.",
                        {
                            "not-pending": error_example(
                                "Not PENDING",
                                ApiError(
                                    400,
                                    "UnsupportedOperation",
                                    "Failed to cancel the task, please confirm if the task "
                                    "status is PENDING.",
                                ),
                            ),
                            "task-not-exist": unknown_task,
                        },
                    ),
                    "401": "Unauthorized",
                    "503": error_response(
                        "The task's channel could not be reached.",
                        {"unavailable": UNAVAILABLE_EXAMPLE},
                    ),
                    "504": error_response(
                        "DashScope did not answer in time.", {"timeout": TIMEOUT_EXAMPLE}
                    ),
                },
            }
        },
    )
    spec.path(
        path="/tasks",
        operations={
            "get": {
                "operationId": "listTasks",
                "tags": ["tasks"],
                "summary": "List the caller's account's tasks",
                "description": "Time filters are `YYYYMMDDhhmmss` (UTC).",
                "parameters": [{"in": "query", "schema": TaskListQuerySchema}],
                "responses": {
                    "200": json_response(
                        "A page of tasks, newest first.",
                        TaskListResponseSchema,
                        {"page": {"value": TASK_LIST_EXAMPLE}},
                    ),
                    "400": error_response(
                        "A query parameter is invalid.",
                        {
                            "invalid-parameter": error_example(
                                "Invalid page size",
                                ApiError(
                                    400,
                                    "InvalidParameter",
                                    "page_size: Must be greater than or equal to 1 and less "
                                    "than or equal to 100.",
                                ),
                            )
                        },
                    ),
                    "401": "Unauthorized",
                },
            }
        },
    )


def submit_body(examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return the request body of a submit route, with its examples."""
    return {
        "required": True,
        "description": "DashScope's submit body. Fields not listed are allowed and forwarded.",
        "content": {
            "application/json": {"schema": VideoSynthesisRequestSchema, "examples": examples}
        },
    }


def submit_responses() -> dict[str, Any]:
    """Return the answers of a submit route: DashScope's, or the gateway's own errors."""
    invalid_duration = {"model": "m", "input": {}, "parameters": {"duration": "5"}}
    return {
        "200": json_response(
            "The task was accepted; poll `GET /tasks/{task_id}`.",
            SubmitResponseSchema,
            {
                "accepted": {
                    "value": {
                        "request_id": EXAMPLE_REQUEST_ID,
                        "output": {"task_id": EXAMPLE_TASK_ID, "task_status": "PENDING"},
                    }
                }
            },
        ),
        "400": error_response(
            "The body is invalid, the model is not available to this key, or DashScope "
            "refused the request (its error passes through).",
            {
                "invalid-parameter": error_example(
                    "A known field of the wrong type",
                    # The schema's own words, so the example cannot drift from the real answer.
                    ApiError(
                        400,
                        "InvalidParameter",
                        first_error(video_synthesis_request_schema.validate(invalid_duration)),
                    ),
                ),
                "empty-model": error_example(
                    "No model",
                    ApiError(
                        400,
                        "BadRequest.EmptyModel",
                        'Required parameter "model" missing from request.',
                    ),
                ),
                "empty-input": error_example(
                    "No input",
                    ApiError(
                        400,
                        "BadRequest.EmptyInput",
                        'Required parameter "input" missing from request.',
                    ),
                ),
                "model-not-found": error_example(
                    "Model not offered, or not in the key's allowlist",
                    model_not_found("wan9-t2v"),
                ),
                "data-inspection-failed": error_example(
                    "DashScope's content moderation (passed through)",
                    ApiError(
                        400,
                        "DataInspectionFailed",
                        "Input data may contain inappropriate content.",
                    ),
                ),
            },
        ),
        "401": "Unauthorized",
        "413": error_response(
            "The body is over the size limit.",
            {
                "too-large": error_example(
                    "Too large",
                    ApiError(
                        413,
                        "BadRequest.TooLarge",
                        "The data value transmitted exceeds the capacity limit.",
                    ),
                )
            },
        ),
        "429": error_response(
            "Every channel serving the model is throttled (DashScope's answer passes through).",
            {
                "throttling": error_example(
                    "Throttled",
                    ApiError(
                        429,
                        "Throttling.RateQuota",
                        "Requests rate limit exceeded, please try again later.",
                    ),
                )
            },
        ),
        "503": error_response(
            "The model cannot be served right now, or no channel is reachable.",
            {
                "model-unavailable": error_example(
                    "Every channel of the model is cooling down",
                    ApiError(
                        503,
                        "model_not_found",
                        "The model `wan2.5-t2v-preview` is temporarily unavailable, "
                        "try again later.",
                    ),
                ),
                "unavailable": UNAVAILABLE_EXAMPLE,
            },
        ),
        "504": error_response(
            "DashScope did not answer in time; the task may exist upstream.",
            {"timeout": TIMEOUT_EXAMPLE},
        ),
    }


def task_examples() -> dict[str, dict[str, Any]]:
    """Return examples of a task query's answer, one per interesting state."""
    base = {"task_id": EXAMPLE_TASK_ID, "submit_time": "2025-09-25 11:07:28.590"}
    started = {**base, "scheduled_time": "2025-09-25 11:07:35.349"}
    return {
        "pending": {
            "summary": "Queued",
            "value": {
                "request_id": EXAMPLE_REQUEST_ID,
                "output": {**base, "task_status": "PENDING"},
            },
        },
        "running": {
            "summary": "Running",
            "value": {
                "request_id": EXAMPLE_REQUEST_ID,
                "output": {**started, "task_status": "RUNNING"},
            },
        },
        "succeeded": {
            "summary": "Done: the video link is valid for 24 h",
            "value": {
                "request_id": EXAMPLE_REQUEST_ID,
                "output": {
                    **started,
                    "task_status": "SUCCEEDED",
                    "end_time": "2025-09-25 11:12:02.118",
                    "orig_prompt": "A kitten running through a moonlit garden",
                    "actual_prompt": "A small tabby kitten runs through a moonlit garden...",
                    "video_url": "https://dashscope-result.example.com/0385dc79.mp4?Expires=1",
                },
                "usage": {"duration": 5, "SR": 480, "video_count": 1},
            },
        },
        "failed": {
            "summary": "Failed: the reason is inside `output`",
            "value": {
                "request_id": EXAMPLE_REQUEST_ID,
                "output": {
                    **started,
                    "task_status": "FAILED",
                    "end_time": "2025-09-25 11:08:01.002",
                    "code": "DataInspectionFailed",
                    "message": "Output data may contain inappropriate content.",
                },
            },
        },
    }


def error_response(description: str, examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return an error response in DashScope's envelope."""
    return json_response(description, ErrorSchema, examples)


def json_response(
    description: str, schema: type[Any], examples: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Return a JSON response object with its schema, examples and request-id header."""
    return {
        "description": description,
        "headers": {"X-Request-Id": "RequestId"},
        "content": {"application/json": {"schema": schema, "examples": examples}},
    }


def strftime_datetime_properties(
    _converter: Any, field: fields.Field[Any], ret: dict[str, Any], **_kwargs: Any
) -> dict[str, Any]:
    """Describe a DateTime field with a strftime format by an example of that format."""
    if not isinstance(field, fields.DateTime) or "%" not in (field.format or ""):
        return {}
    # apispec writes `format: null` (and `pattern: null`) for such fields: invalid OpenAPI.
    for key in ("format", "pattern"):
        if ret.get(key, "") is None:
            del ret[key]
    return {"example": datetime(2025, 9, 25, 11, 7, 28).strftime(field.format or "")}


def package_version() -> str:
    """Return the installed gateway's version."""
    try:
        return version("bailian-gateway")
    except PackageNotFoundError:
        # Run from a plain checkout (not pip-installed): the document still serves.
        return "0.0.0"
