"""Structured logs: JSON lines through the standard `logging` module, with the request's id."""

from __future__ import annotations

import logging
from typing import Any

from flask import g, has_request_context
from pythonjsonlogger.orjson import OrjsonFormatter

# Logger names an operator can route elsewhere (gunicorn.conf.py's GATEWAY_LOG_CONFIG).
GATEWAY_LOGGER = "bailian_gateway"
ACCESS_LOGGER = "bailian_gateway.access"

# gunicorn_hooks.py builds the same formatter for gunicorn's own logs (it must not import the app,
# or a HUP would not load new code): keep the two in step.
JSON_FORMAT: dict[str, Any] = {
    "fmt": "%(levelname)s %(name)s %(message)s",
    "rename_fields": {"levelname": "level", "name": "logger"},
    "timestamp": "time",
}


def json_formatter() -> logging.Formatter:
    """Return the formatter of every gateway log line: one JSON object per record."""
    # orjson rather than the json module: a line costs about half the instructions to format,
    # and every request writes one or two of them.
    return OrjsonFormatter(**JSON_FORMAT)


def configure_logging() -> None:
    """Log JSON lines to stderr, unless the host process (gunicorn, pytest) set logging up."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(json_formatter())
        root.addHandler(handler)
    gateway = logging.getLogger(GATEWAY_LOGGER)
    # Access lines and failed upstream calls are INFO; an operator's own level (set before us) wins.
    if gateway.level == logging.NOTSET:
        gateway.setLevel(logging.INFO)
    _stamp_request_ids()


def _stamp_request_ids() -> None:
    # A record factory, not a handler filter: the handlers may be gunicorn's or an operator's,
    # and every line logged while a request is handled should carry its id.
    previous = logging.getLogRecordFactory()
    if getattr(previous, "stamps_request_ids", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if has_request_context():
            request_id = getattr(g._get_current_object(), "request_id", None)
            if request_id is not None:
                record.request_id = request_id
        return record

    factory.stamps_request_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
