"""Marshmallow schemas for request bodies, named for the operation they validate."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, INCLUDE, Schema, ValidationError, fields, validate

from app.billing.prices import MAX_VIDEO_SECONDS

MAX_SEED = 2_147_483_647
# How deep a submit body may nest arrays and objects: DashScope's go three or four levels, and
# deeper ones only cost the gateway stack and time.
MAX_BODY_DEPTH = 64
# The last task-list page asked for: far past any account's tasks (pages of up to 100), and
# an offset that every database's integer holds (PostgreSQL's and SQLite's are 64-bit).
MAX_PAGE_NO = 2_147_483_647
TASK_STATUSES = ("PENDING", "RUNNING", "SUSPENDED", "SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN")
# DashScope's task-list time filters: YYYYMMDDhhmmss (taken as UTC here).
LIST_TIME_FORMAT = "%Y%m%d%H%M%S"


class StrictBoolean(fields.Boolean):
    """A JSON true or false, and nothing that merely looks like one ("yes", 1)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    """A JSON integer: not "5", not 5.0, not true."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class _OpenSchema(Schema):
    # Unknown fields pass: upstream owns per-model rules, and new models must work on day one.
    class Meta:
        unknown = INCLUDE


def _optional(field: type[fields.Field[Any]], **kwargs: Any) -> Any:
    # null is how JSON clients say "not set"; upstream decides what it means.
    return field(allow_none=True, **kwargs)


class MediaItemSchema(_OpenSchema):
    """One typed asset of the newest models' `input.media`."""

    type = _optional(fields.String)
    url = _optional(fields.String)


class VideoSynthesisInputSchema(_OpenSchema):
    """The `input` object of a video-synthesis submit."""

    prompt = _optional(fields.String)
    negative_prompt = _optional(fields.String)
    img_url = _optional(fields.String)
    audio_url = _optional(fields.String)
    template = _optional(fields.String)
    first_frame_url = _optional(fields.String)
    last_frame_url = _optional(fields.String)
    ref_images_url = _optional(fields.List, cls_or_instance=fields.String())
    video_url = _optional(fields.String)
    function = _optional(fields.String)
    media = _optional(fields.List, cls_or_instance=fields.Nested(MediaItemSchema))
    extend_prompt = _optional(StrictBoolean)


class VideoSynthesisParametersSchema(_OpenSchema):
    """The `parameters` object of a video-synthesis submit."""

    resolution = _optional(fields.String)
    size = _optional(fields.String)
    # Seconds of video: a duration of 0 or less would reserve nothing or credit the account.
    duration = _optional(StrictInteger, validate=validate.Range(min=1, max=MAX_VIDEO_SECONDS))
    prompt_extend = _optional(StrictBoolean)
    watermark = _optional(StrictBoolean)
    audio = _optional(StrictBoolean)
    seed = _optional(StrictInteger, validate=validate.Range(min=0, max=MAX_SEED))
    shot_type = _optional(fields.String)


class VideoSynthesisRequestSchema(_OpenSchema):
    """A submit body: `{"model", "input", "parameters"}`, as DashScope takes it."""

    model = fields.String(required=True, validate=validate.Length(min=1))
    input = fields.Nested(VideoSynthesisInputSchema, required=True)
    parameters = _optional(fields.Nested, nested=VideoSynthesisParametersSchema)


video_synthesis_request_schema = VideoSynthesisRequestSchema()


def deeper_than(value: Any, limit: int) -> bool:
    """Return whether a decoded JSON value nests arrays and objects more than `limit` deep."""
    # Level by level rather than recursively: the value to check is the client's.
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return False
    return any(isinstance(item, dict | list) for item in level)


def first_error(messages: Any, path: str = "") -> str:
    """Return the first marshmallow error as `field.path: message`."""
    if isinstance(messages, dict):
        key, value = next(iter(messages.items()))
        # "_schema" holds whole-object errors; fields.Dict nests per-entry "key"/"value" errors.
        if key in ("_schema", "key", "value"):
            return first_error(value, path)
        child = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        return first_error(value, child)
    if isinstance(messages, list) and messages:
        return first_error(messages[0], path)
    return f"{path}: {messages}" if path else str(messages)


def validation_message(error: ValidationError) -> str:
    """Return a client-facing message naming the first invalid field."""
    return first_error(error.messages)


class TaskListQuerySchema(Schema):
    """The query string of `GET /tasks`, as DashScope's task list takes it."""

    class Meta:
        # DashScope's own filters that mean nothing here (api_key_id, region) are ignored.
        unknown = EXCLUDE

    page_no = fields.Integer(load_default=1, validate=validate.Range(min=1, max=MAX_PAGE_NO))
    page_size = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100))
    status = fields.String(validate=validate.OneOf(TASK_STATUSES))
    # No model has a NUL in its name, and PostgreSQL's text cannot hold one.
    model_name = fields.String(validate=validate.Regexp(r"[^\x00]*\Z", error="Not a model name."))
    start_time = fields.DateTime(format=LIST_TIME_FORMAT)
    end_time = fields.DateTime(format=LIST_TIME_FORMAT)


task_list_query_schema = TaskListQuerySchema()


# Response schemas only document answers (app/openapi.py); nothing loads with them. Most
# answers are DashScope's, forwarded as they came, so they stay open like the request schemas.


class SubmitOutputSchema(_OpenSchema):
    """The `output` of an accepted submit."""

    task_id = fields.String(required=True, metadata={"description": "DashScope's own task id."})
    task_status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))


class SubmitResponseSchema(_OpenSchema):
    """DashScope's answer to an accepted submit."""

    request_id = fields.String(required=True)
    output = fields.Nested(SubmitOutputSchema, required=True)


class CheckResponseSchema(_OpenSchema):
    """DashScope's answer to a synchronous check, forwarded as it came."""

    request_id = fields.String(required=True)
    output = fields.Dict(required=True, metadata={"description": "`check_pass` and the findings."})
    usage = fields.Dict(metadata={"description": "What was billed, e.g. `image_count`."})


class PolicyResponseSchema(_OpenSchema):
    """DashScope's getPolicy answer, forwarded as it came."""

    request_id = fields.String(required=True)
    data = fields.Dict(required=True, metadata={"description": "The OSS form fields and host."})


class TaskOutputSchema(_OpenSchema):
    """The `output` of a task query; which fields appear depends on the task's status."""

    task_id = fields.String(required=True)
    task_status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    submit_time = fields.String(metadata={"description": "`YYYY-MM-DD HH:MM:SS.mmm`."})
    scheduled_time = fields.String(metadata={"description": "When a worker picked the task up."})
    end_time = fields.String(metadata={"description": "When the task finished."})
    video_url = fields.String(metadata={"description": "SUCCEEDED: a signed link, valid 24 h."})
    orig_prompt = fields.String(metadata={"description": "The prompt as submitted."})
    actual_prompt = fields.String(metadata={"description": "The prompt after extension."})
    code = fields.String(metadata={"description": "FAILED: why, inside `output`."})
    message = fields.String(metadata={"description": "FAILED: the details."})


class TaskResponseSchema(_OpenSchema):
    """DashScope's answer to a task query, in every task state."""

    request_id = fields.String(required=True)
    output = fields.Nested(TaskOutputSchema, required=True)
    usage = fields.Dict(
        metadata={"description": "SUCCEEDED: what was billed; key names differ by model family."}
    )


class CancelResponseSchema(_OpenSchema):
    """DashScope's answer to an accepted cancel."""

    request_id = fields.String(required=True)


class TaskListItemSchema(_OpenSchema):
    """One task of a task-list page."""

    task_id = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    model_name = fields.String(required=True)
    api_key_id = fields.String(metadata={"description": "The gateway key that submitted it."})
    gmt_create = fields.Integer(required=True, metadata={"description": "Epoch milliseconds."})
    end_time = fields.Integer(allow_none=True, metadata={"description": "Epoch milliseconds."})


class TaskListTaskSchema(_OpenSchema):
    """One task of a task-list page as SDK 2.x reads it: the types of a task query's `output`."""

    task_id = fields.String(required=True)
    task_status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    model_name = fields.String(required=True)
    api_key_id = fields.String(metadata={"description": "The gateway key that submitted it."})
    submit_time = fields.String(
        required=True, metadata={"description": "`YYYY-MM-DD HH:MM:SS.mmm`."}
    )
    scheduled_time = fields.String(metadata={"description": "When a worker picked the task up."})
    end_time = fields.String(metadata={"description": "When the task finished."})


class TaskListResponseSchema(_OpenSchema):
    """A page of the account's tasks, in DashScope's task-list format."""

    request_id = fields.String(required=True)
    total = fields.Integer(required=True)
    total_page = fields.Integer(required=True)
    page_no = fields.Integer(required=True)
    page_size = fields.Integer(required=True)
    data = fields.List(fields.Nested(TaskListItemSchema), required=True)
    tasks = fields.List(
        fields.Nested(TaskListTaskSchema),
        required=True,
        metadata={"description": "The same tasks as `data`, for SDK 2.x's `jobs.list`."},
    )


class ErrorSchema(_OpenSchema):
    """DashScope's error envelope, used by every non-2xx answer."""

    request_id = fields.String(required=True)
    code = fields.String(required=True)
    message = fields.String(required=True)


class TaskNotExistSchema(ErrorSchema):
    """The one answer for a task that is unknown, malformed, expired or another account's."""

    data = fields.Raw(required=True, allow_none=True, validate=validate.Equal(None))
