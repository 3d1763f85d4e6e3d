"""The errors blueprint: every error the gateway decides, in DashScope's native envelope."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, g, request
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from app.billing.ledger import LimitExceeded
from app.billing.prices import NotEstimable
from app.channels import AllChannelsFailed, NoUsableChannel
from app.submitting import WriteAheadFailed
from app.upstream import UpstreamError, UpstreamThrottled, UpstreamTimeout

log = logging.getLogger(__name__)

bp = Blueprint("errors", __name__)

# DashScope's codes for the HTTP errors Flask and Werkzeug raise themselves.
CODES_BY_STATUS = {
    400: "InvalidParameter",
    401: "InvalidApiKey",
    403: "AccessDenied",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeOut",
    413: "BadRequest.TooLarge",
    429: "Throttling",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "RequestTimeOut",
}


class ApiError(Exception):
    """An error answer the gateway decided on: HTTP status, native code and message."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def error_response(status: int, code: str, message: str, **extra: Any) -> Response:
    """Build DashScope's error envelope: request_id, code, message, as application/json."""
    body = {"request_id": g.get("request_id", ""), "code": code, "message": message, **extra}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def invalid_api_key(message: str = "Invalid API-key provided.") -> ApiError:
    """Return the error for a missing or unknown gateway key."""
    return ApiError(401, "InvalidApiKey", message)


def model_not_found(model: str) -> ApiError:
    """Return the error for a model that is not offered or not allowed for the key."""
    return ApiError(
        400,
        "model_not_found",
        f"The model `{model}` does not exist or you do not have access to it.",
    )


def task_not_exist() -> ApiError:
    """Return the one answer for a task that is unknown, expired or another account's."""
    return ApiError(400, "task_not_exist", "task_not_exist", data=None)


@bp.app_errorhandler(ApiError)
def handle_api_error(error: ApiError) -> Response:
    """Render an error the gateway decided on."""
    return error_response(error.status, error.code, error.message, **error.extra)


@bp.app_errorhandler(HTTPException)
def handle_http_exception(error: HTTPException) -> Response:
    """Render routing, method and body-size errors natively instead of as HTML."""
    status = error.code or 500
    code = CODES_BY_STATUS.get(status, (error.name or "Error").replace(" ", ""))
    response = error_response(status, code, error.description or error.name)
    valid_methods = getattr(error, "valid_methods", None)
    if valid_methods:
        response.headers["Allow"] = ", ".join(valid_methods)
    return response


@bp.app_errorhandler(ParseException)
def handle_malformed_body(_error: ParseException) -> Response:
    """Refuse a chunked request body gunicorn could not parse (a bad chunk size or terminator)."""
    # gunicorn parses a chunked body while the view reads it, so its parse errors surface here.
    # (A body cut short is an OSError, which Werkzeug's stream already turns into a 400.) Their
    # text quotes the client's bytes: it is not repeated.
    return error_response(
        400, "InvalidParameter", "The request body is not valid chunked transfer coding."
    )


@bp.app_errorhandler(NoUsableChannel)
def handle_no_usable_channel(error: NoUsableChannel) -> Response:
    """Tell the client the model exists but cannot be served right now."""
    return error_response(
        503, "model_not_found", f"The model `{error}` is temporarily unavailable, try again later."
    )


@bp.app_errorhandler(AllChannelsFailed)
def handle_all_channels_failed(_error: AllChannelsFailed) -> Response:
    """Tell the client no upstream could take the request."""
    return error_response(503, "ServiceUnavailable", "The upstream service is unavailable.")


@bp.app_errorhandler(UpstreamError)
def handle_upstream_error(error: UpstreamError) -> Response:
    """Map transport failures with DashScope to gateway errors."""
    log.warning(
        "upstream call failed: %s", error, extra={"channel": error.channel, "cause": error.cause}
    )
    g.channel = error.channel
    if isinstance(error, UpstreamTimeout):
        response = error_response(
            504, "RequestTimeOut", "The upstream service did not answer in time."
        )
    elif isinstance(error, UpstreamThrottled):  # a 429 DashScope's JSON did not come with
        response = error_response(
            429, "Throttling", "Requests rate limit exceeded, please try again later."
        )
    else:
        response = error_response(503, "ServiceUnavailable", "The upstream service is unavailable.")
    if request.method == "POST" and not error.nothing_created:
        # DashScope may have acted on it (a submit created, and bills, a video): a client that
        # resends would pay twice. The gateway finds the task and records it for the account.
        response.headers["x-should-retry"] = "false"
    return response


@bp.app_errorhandler(LimitExceeded)
def handle_limit_exceeded(error: LimitExceeded) -> Response:
    """Refuse a submit whose estimate does not fit the account's limit; nothing was sent."""
    return error_response(400, "Arrearage", str(error))


@bp.app_errorhandler(NotEstimable)
def handle_not_estimable(error: NotEstimable) -> Response:
    """Refuse a submit that cannot be priced (a tier without a price); nothing was sent."""
    return error_response(400, "InvalidParameter", str(error))


@bp.app_errorhandler(WriteAheadFailed)
def handle_write_ahead_failed(_error: WriteAheadFailed) -> Response:
    """Tell the client its submit was not sent, because it could not be recorded first."""
    return error_response(
        503,
        "ServiceUnavailable",
        "The gateway cannot record submits right now; nothing was sent, try again later.",
    )


@bp.app_errorhandler(SQLAlchemyError)
def handle_database_error(error: SQLAlchemyError) -> Response:
    """Tell the client the gateway's database is unavailable, logging only the kind of error."""
    # A driver's message may quote the values of the row it refused (PostgreSQL's "Failing row
    # contains ..."): keys' hashes, DashScope's answers. Its type says enough to act on.
    log.error("database error: %s", type(error).__name__)
    return error_response(503, "ServiceUnavailable", "The gateway's database is unavailable.")


@bp.app_errorhandler(Exception)
def handle_unexpected(error: Exception) -> Response:
    """Log a bug and answer a native 500 instead of a stack trace."""
    log.exception("unhandled error", exc_info=error)
    return error_response(500, "InternalError", "An internal error occurred.")
