"""Liveness and readiness, outside the compatibility prefix and without a key."""

from __future__ import annotations

import socket

from flask import Blueprint, Response, jsonify
from sqlalchemy.exc import SQLAlchemyError

from app.gateway import current_gateway
from app.store import utcnow
from app.store.leases import probe_write

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Answer that the process is alive, touching nothing."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Answer whether the database takes writes and some configured channel works."""
    gateway = current_gateway()
    # The journal's backlog is worth knowing whatever else is true.
    journal = {"journal_lines": lines} if (lines := gateway.journal.lines()) else {}
    try:
        # A submit writes before it is sent: a database that only reads serves no submit.
        probe_write(gateway.engine, socket.gethostname(), utcnow())
    except SQLAlchemyError as exc:
        reason = f"database cannot be written: {type(exc).__name__}"
        return jsonify(status="unavailable", reason=reason, **journal), 503
    channels = len(gateway.settings.channels)
    if not channels:
        return jsonify(status="unavailable", reason="no channels configured", **journal), 503
    # As this worker process saw them. Some failing channels leave the others to serve (and
    # stored tasks to answer): only when every one fails is the instance not worth traffic.
    failing = gateway.pool.failing()
    if len(failing) == channels:
        body = jsonify(
            status="unavailable",
            reason="every channel is failing",
            channels=channels,
            failing_channels=failing,
            **journal,
        )
        return body, 503
    return jsonify(status="ok", channels=channels, failing_channels=failing, **journal), 200
