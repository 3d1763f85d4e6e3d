"""Per-request observation: request metrics and one access log line per request."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from app.gateway import current_gateway
from app.observability import metrics
from app.observability.logs import ACCESS_LOGGER

access_log = logging.getLogger(ACCESS_LOGGER)


def observe_requests(app: Flask) -> None:
    """Time every request, count it by route and status, and log one line about it."""
    app.before_request(_start_clock)
    app.after_request(_observe)


def _start_clock() -> None:
    g.request_started = time.perf_counter()


def _observe(response: Response) -> Response:
    seconds = time.perf_counter() - g.get("request_started", time.perf_counter())
    # The endpoint name, never the path: paths carry task ids and whatever a client types.
    route = request.endpoint or metrics.UNMATCHED_ROUTE
    metrics.http_requests.labels(
        route, metrics.method_label(request.method), str(response.status_code)
    ).inc()
    metrics.http_request_duration.labels(route).observe(seconds)
    caller = g.get("caller")
    # Only a model the configuration offers: a client may paste anything there, its key included.
    model = g.get("model")
    if model is not None:
        model = metrics.label_from(model, current_gateway().settings.offered_models)
    access_log.info(
        "%s %s %s",
        request.method,
        route,
        response.status_code,
        extra={
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "duration_ms": round(seconds * 1000, 1),
            "account": caller.account_name if caller is not None else None,
            "key_id": caller.key_id if caller is not None else None,
            "model": model,
            "channel": g.get("channel"),
            "upstream_status": g.get("upstream_status"),
            "upstream_request_id": g.get("upstream_request_id"),
        },
    )
    return response
