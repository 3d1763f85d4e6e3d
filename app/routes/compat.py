"""DashScope's native video routes, served under /alibailian/api/v1."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from marshmallow import ValidationError
from werkzeug.exceptions import RequestEntityTooLarge

from app import refresh, task_list, uploads
from app.auth import authenticate
from app.billing.prices import to_cent
from app.bodies import BodyTimeout, DuplicateKey, loads_unique, oss_urls, read_within
from app.checks import check_with_failover
from app.config import Channel
from app.errors import ApiError, model_not_found, task_not_exist
from app.gateway import current_gateway
from app.observability import metrics
from app.schemas import (
    MAX_BODY_DEPTH,
    deeper_than,
    first_error,
    task_list_query_schema,
    validation_message,
    video_synthesis_request_schema,
)
from app.services import BY_PATH, SERVICES
from app.store import (
    Caller,
    Task,
    claim_refresh,
    force_refresh,
    get_owned_task,
    list_owned_tasks,
)
from app.submitting import SubmitRequest, Submitted, submit_paid
from app.upstream import (
    FORWARDED_SUBMIT_HEADERS,
    OSS_RESOLVE_HEADER,
    TASK_ID_PATTERN,
    UpstreamAnswer,
    UpstreamBrokenAnswer,
)

log = logging.getLogger(__name__)

bp = Blueprint("compat", __name__)


@bp.before_request
def take_turn() -> None:
    """Wait for this worker to have a place for the request, behind those that came first."""
    current_gateway().turns.take()
    g.has_turn = True


@bp.teardown_request
def end_turn(_error: BaseException | None) -> None:
    """Hand the request's place to the next one waiting."""
    if g.pop("has_turn", False):
        current_gateway().turns.give_up()


def submit_video_synthesis(group: str, function: str) -> Response:
    """Forward an async task's submit unchanged and remember which account owns the task."""
    caller = authenticate()
    body, model, parameters = load_submit_body()
    ensure_model_allowed(caller, model)
    gateway = current_gateway()
    holder = oss_upload_channel(caller, model)
    submit = SubmitRequest(
        caller,
        model,
        BY_PATH[(group, function)].path,
        body,
        forwarded_headers(),
        parameters,
        holder,
        prompt=g.submit_input.get("prompt"),
    )
    # The upstream call and any wait on the database for its record: neither needs the CPU.
    with gateway.turns.set_aside():
        submitted = submit_paid(gateway, submit)
    count_submit(submitted.channel, model, submitted.answer)
    return with_money_headers(native_response(submitted.answer), submitted)


def call_synchronous_service(group: str, function: str) -> Response:
    """Forward a synchronous check unchanged (no async header) and answer what DashScope said."""
    caller = authenticate()
    body, model, _parameters = load_submit_body()
    gateway = current_gateway()
    # A check makes no video to price: a channel serving the model and the key's allowlist do.
    if not any(model in channel.models for channel in gateway.pool.channels):
        raise model_not_found(model)
    if not caller.may_use(model):
        raise model_not_found(model)
    path = BY_PATH[(group, function)].path
    only = uploads.only_channel(gateway.pool, oss_upload_channel(caller, model))
    with gateway.turns.set_aside():
        channel, answer = check_with_failover(
            gateway.pool, gateway.client, model, path, body, forwarded_headers(), only
        )
    g.channel = channel.name
    return native_response(answer)


@bp.get("/uploads")
def get_upload_policy() -> Response:
    """Forward DashScope's getPolicy to the account's channel and remember the upload directory."""
    caller = authenticate()
    if request.args.get("action") != "getPolicy":
        raise ApiError(400, "InvalidParameter", "action: must be getPolicy.")
    model = request.args.get("model") or ""
    if not model:
        raise ApiError(400, "BadRequest.EmptyModel", 'Required parameter "model" missing.')
    g.model = model
    ensure_model_allowed(caller, model)
    gateway = current_gateway()
    if not uploads.allow_policy(gateway, caller):
        raise ApiError(429, "Throttling.RateQuota", "Too many upload policies, slow down.")
    channel = uploads.policy_channel(gateway, caller, model)
    with gateway.turns.set_aside():
        answer = gateway.client.get_upload_policy(channel, model)
    if answer.status in (401, 403):
        gateway.pool.report_failure(channel, auth=True)
        raise UpstreamBrokenAnswer(
            channel.name, f"getPolicy refused the channel key ({answer.status})"
        )
    g.channel = channel.name
    if answer.status == 200:
        uploads.remember_policy(gateway, caller, channel, model, answer.data)
    return native_response(answer)


def oss_upload_channel(caller: Caller, model: str) -> str | None:
    """Return the channel holding the submit's `oss://` files, or fail naming the field."""
    try:
        return uploads.upload_channel(current_gateway(), caller, model, g.get("submit_input"))
    except uploads.OssInputRefused as exc:
        raise ApiError(400, "InvalidParameter", str(exc)) from None


# One rule per service DashScope has (app/services.py): any other function is a native 404.
for _service in SERVICES:
    bp.add_url_rule(
        f"/services/aigc/{_service.group}/{_service.function}",
        view_func=submit_video_synthesis if _service.asynchronous else call_synchronous_service,
        methods=["POST"],
        defaults={"group": _service.group, "function": _service.function},
    )


@bp.get("/tasks/<task_id>")
def get_task(task_id: str) -> Response:
    """Answer a task query, asking upstream at most once per refresh interval."""
    caller = authenticate()
    task = get_owned_task_or_fail(caller, task_id)
    gateway = current_gateway()
    channel = gateway.pool.get(task.channel)
    if task.is_final or channel is None:
        return stored_answer(task, "final" if task.is_final else "channel_removed")
    if not claim_due_refresh(task):
        return stored_answer(task, "fresh", stale=gateway.stale_tasks.get(task.task_id))
    answer = refresh_task(channel, task)
    if isinstance(answer, str):
        return stored_answer(task, "upstream_failed", stale=answer)
    return native_response(answer)


@bp.post("/tasks/<task_id>/cancel")
def cancel_task(task_id: str) -> Response:
    """Ask the task's own channel to cancel a PENDING task."""
    caller = authenticate()
    task = get_owned_task_or_fail(caller, task_id)
    gateway = current_gateway()
    channel = gateway.pool.get(task.channel)
    if task.is_final or channel is None:
        raise cannot_cancel()
    with gateway.turns.set_aside():
        answer = gateway.client.cancel_task(channel, task.task_id)
    if answer.status in (401, 403):
        raise UpstreamBrokenAnswer(
            channel.name, f"cancel refused the channel key ({answer.status})"
        )
    if answer.status == 200:
        force_refresh(gateway.engine, task.task_id)
    return native_response(answer)


@bp.get("/tasks")
def list_tasks() -> Response:
    """List the account's tasks from the store, in DashScope's task-list format."""
    caller = authenticate()
    query = load_list_query()
    total, page = list_owned_tasks(
        current_gateway().engine,
        caller.account_id,
        submitted_after=max(query.get("start_time", datetime.min), retention_cutoff()),
        submitted_before=query.get("end_time"),
        status=query.get("status"),
        model=query.get("model_name"),
        offset=(query["page_no"] - 1) * query["page_size"],
        limit=query["page_size"],
    )
    return task_list_response(total, page, query["page_no"], query["page_size"])


def load_submit_body() -> tuple[bytes, str, dict[str, Any] | None]:
    """Return the raw submit body, its model and parameters, or fail with DashScope's 400."""
    gateway = current_gateway()
    # A client may upload slowly: its wait is not the worker's, and it has body_timeout seconds.
    with gateway.turns.set_aside():
        try:
            body = read_within(
                request.stream,
                request.environ.get("gunicorn.socket"),
                gateway.settings.body_timeout,
            )
        except BodyTimeout:
            raise ApiError(
                408, "RequestTimeOut", "The request body did not arrive in time."
            ) from None
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is None and len(body) >= limit:
        # A chunked body is cut at the limit rather than refused; refuse it the same way.
        raise RequestEntityTooLarge()
    try:
        data = loads_unique(body)
    except RecursionError:  # nested past the interpreter's stack: far past MAX_BODY_DEPTH
        raise nested_too_deeply() from None
    except DuplicateKey as exc:
        raise ApiError(
            400, "InvalidParameter", f"The request body repeats the key {json.dumps(exc.key)}."
        ) from None
    except ValueError:
        raise ApiError(400, "InvalidParameter", "The request body is not valid JSON.") from None
    if deeper_than(data, MAX_BODY_DEPTH):
        raise nested_too_deeply()
    if not isinstance(data, dict):
        raise ApiError(400, "InvalidParameter", "The request body must be a JSON object.")
    if data.get("model") in (None, ""):
        raise ApiError(
            400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'
        )
    if data.get("input") is None:
        raise ApiError(
            400, "BadRequest.EmptyInput", 'Required parameter "input" missing from request.'
        )
    errors = video_synthesis_request_schema.validate(data)
    if errors:
        raise ApiError(400, "InvalidParameter", first_error(errors))
    g.model = data["model"]
    g.submit_input = data["input"]
    parameters = data.get("parameters")
    return body, data["model"], parameters if isinstance(parameters, dict) else None


def with_money_headers(response: Response, submitted: Submitted) -> Response:
    """Add this submit's estimate, and what remains of the account's limit, to the answer.

    Only to an accepted submit's: a refused one reserved nothing (its reservation is released).
    """
    if submitted.answer.status != 200:
        return response
    response.headers["X-Gateway-Estimate"] = to_cent(submitted.estimate.amount)
    if submitted.remaining is not None:
        response.headers["X-Gateway-Remaining"] = to_cent(submitted.remaining)
    return response


def nested_too_deeply() -> ApiError:
    """Return the error for a submit body that nests past MAX_BODY_DEPTH."""
    return ApiError(
        400,
        "InvalidParameter",
        f"The request body nests arrays and objects deeper than {MAX_BODY_DEPTH} levels.",
    )


def forwarded_headers() -> dict[str, str]:
    """Return the client's headers that mean the same to DashScope through a gateway."""
    # request.headers ignores case, so a client's spelling of the name does not matter.
    headers = {
        name: request.headers[name] for name in FORWARDED_SUBMIT_HEADERS if name in request.headers
    }
    if any(oss_urls(g.get("submit_input"))):
        # What the SDK sends with a file it uploaded: DashScope fails such a submit without it.
        headers[OSS_RESOLVE_HEADER] = "enable"
    return headers


def ensure_model_allowed(caller: Caller, model: str) -> None:
    """Fail with `model_not_found` unless the model is offered and the key may use it."""
    if model not in current_gateway().settings.offered_models or not caller.may_use(model):
        raise model_not_found(model)


def count_submit(channel: Channel, model: str, answer: UpstreamAnswer) -> None:
    """Count a submit DashScope answered, under a model label the configuration offers."""
    g.channel, g.task_id = channel.name, answer.task_id
    offered = current_gateway().settings.offered_models
    metrics.submits.labels(metrics.label_from(model, offered), str(answer.status)).inc()


def retention_cutoff() -> datetime:
    """Return the submit time before which tasks are forgotten."""
    gateway = current_gateway()
    return gateway.clock() - timedelta(hours=gateway.settings.retention_hours)


def get_owned_task_or_fail(caller: Caller, task_id: str) -> Task:
    """Return the caller's account's task, or the one answer that leaks nothing."""
    task = None
    if TASK_ID_PATTERN.fullmatch(task_id):
        gateway, cutoff = current_gateway(), retention_cutoff()
        task = gateway.final_tasks.get(task_id)
        if task is None or task.account_id != caller.account_id or task.submitted_at <= cutoff:
            task = get_owned_task(gateway.engine, caller.account_id, task_id, cutoff)
            if task is not None and task.is_final:
                gateway.final_tasks.put(task_id, task)
    if task is None:
        raise task_not_exist()
    g.model, g.channel, g.task_id = task.model, task.channel, task.task_id
    return task


def claim_due_refresh(task: Task) -> bool:
    """Claim the task's refresh if one is due; one request across all instances wins it."""
    gateway = current_gateway()
    now, interval = gateway.clock(), gateway.settings.refresh_interval
    if interval == 0:
        return True  # every poll may refresh: there is nothing to claim
    # The row just read shows most polls are early, and a claim is a write: skip it then.
    if task.refreshed_at > now - timedelta(seconds=interval):
        return False
    return claim_refresh(gateway.engine, task.task_id, now, interval)


def refresh_task(channel: Channel, task: Task) -> UpstreamAnswer | str:
    """Ask the task's own channel about it and store what changed; else say why it could not."""
    gateway = current_gateway()
    with gateway.turns.set_aside():
        answer = refresh.refresh_task(gateway, channel, task)
    if isinstance(answer, str):
        gateway.stale_tasks.put(task.task_id, answer)
        return answer
    gateway.stale_tasks.discard(task.task_id)
    g.upstream_status = answer.status
    metrics.task_queries.labels("upstream", "refreshed").inc()
    return answer


def load_list_query() -> dict[str, Any]:
    """Return the validated task-list query string, or fail with DashScope's 400."""
    try:
        query: dict[str, Any] = task_list_query_schema.load(request.args.to_dict())
    except ValidationError as error:
        raise ApiError(400, "InvalidParameter", validation_message(error)) from None
    return query


def cannot_cancel() -> ApiError:
    """Return DashScope's error for cancelling a task that is no longer PENDING."""
    return ApiError(
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task status is PENDING.",
    )


def task_list_response(total: int, page: list[Task], page_no: int, page_size: int) -> Response:
    """Render a page of tasks the way DashScope's task list does, for both SDKs."""
    body = task_list.list_body(g.request_id, total, page, page_no, page_size)
    return Response(body, status=200, mimetype="application/json")


def stored_answer(task: Task, reason: str, stale: str | None = None) -> Response:
    """Answer with the last upstream body stored for the task, under this request's id."""
    metrics.task_queries.labels("store", reason).inc()
    members = members_after_request_id(task.upstream_body)
    # The request id is a UUID the gateway made: nothing in it needs escaping.
    body = f'{{"request_id": "{g.request_id}"{members}'
    response = Response(body, status=200, mimetype="application/json")
    if stale is not None:  # a poller would otherwise not know that nothing could be asked
        response.headers["X-Gateway-Stale"] = stale
    return response


@lru_cache(maxsize=1024)
def members_after_request_id(upstream_body: str) -> str:
    """Return a stored answer's members but its request id, as the JSON that follows one."""
    # A finished task is read far more often than it changes: its body is decoded and encoded
    # once, and each answer only puts the request's own id in front.
    body = json.loads(upstream_body)
    body.pop("request_id", None)
    encoded = json.dumps(body)
    return "}" if encoded == "{}" else ", " + encoded[1:]


def native_response(answer: UpstreamAnswer) -> Response:
    """Return DashScope's answer to the client as it came: status and bytes."""
    g.upstream_request_id = answer.request_id
    g.upstream_status = answer.status
    return Response(answer.body, status=answer.status, mimetype="application/json")
