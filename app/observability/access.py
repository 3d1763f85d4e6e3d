"""Per-request observation: a request id, request metrics and one access log line per request."""

from __future__ import annotations

import logging
import random
import time
import uuid

from flask import Flask, Response, g, request

from app.gateway import current_gateway
from app.observability import metrics
from app.observability.logs import ACCESS_LOGGER

access_log = logging.getLogger(ACCESS_LOGGER)


def observe_requests(app: Flask) -> None:
    """Give every request an id and a clock; answer the id, count, time and log the request."""
    app.before_request(_begin)
    app.after_request(_finish)


def _begin() -> None:
    g.request_id = new_request_id()
    g.request_started = time.perf_counter()


def _finish(response: Response) -> Response:
    # Every request passes here: resolve the `g` proxy once rather than on each of its reads.
    state = g._get_current_object()
    seconds = time.perf_counter() - getattr(state, "request_started", time.perf_counter())
    upstream_request_id = getattr(state, "upstream_request_id", None)
    # The upstream's id when there was one, so an operator can quote it to Alibaba Cloud.
    response.headers["X-Request-Id"] = upstream_request_id or getattr(state, "request_id", "")
    # The endpoint name, never the path: paths carry task ids and whatever a client types.
    route = request.endpoint or metrics.UNMATCHED_ROUTE
    method, status = request.method, response.status_code
    metrics.http_requests.labels(route, metrics.method_label(method), str(status)).inc()
    metrics.http_request_duration.labels(route).observe(seconds)
    caller = getattr(state, "caller", None)
    # Only a model the configuration offers: a client may paste anything there, its key included.
    model = getattr(state, "model", None)
    if model is not None:
        model = metrics.label_from(model, current_gateway().settings.offered_models)
    access_log.info(
        "%s %s %s",
        method,
        route,
        status,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 1),
            "account": caller.account_name if caller is not None else None,
            "key_id": caller.key_id if caller is not None else None,
            "model": model,
            "channel": getattr(state, "channel", None),
            "upstream_status": getattr(state, "upstream_status", None),
            "upstream_request_id": upstream_request_id,
            "task_id": getattr(state, "task_id", None),
        },
    )
    return response


def new_request_id() -> str:
    """Return a random UUID (version 4) naming one request."""
    # A request id must be unique, not secret: random's generator serves, where uuid4 asks the
    # kernel (os.urandom). That system call lets go of the GIL, and under load each request
    # then waited for another thread to hand it back. random reseeds in each forked worker.
    return str(uuid.UUID(int=random.getrandbits(128), version=4))
