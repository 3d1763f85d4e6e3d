"""Liveness and readiness, outside the compatibility prefix and without a key."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.gateway import current_gateway

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Answer that the process is alive, touching nothing."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Answer whether the database is reachable and some configured channel works."""
    gateway = current_gateway()
    try:
        with gateway.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return jsonify(status="unavailable", reason=f"database: {type(exc).__name__}"), 503
    channels = len(gateway.settings.channels)
    if not channels:
        return jsonify(status="unavailable", reason="no channels configured"), 503
    # As this worker process saw them. Some failing channels leave the others to serve (and
    # stored tasks to answer): only when every one fails is the instance not worth traffic.
    failing = gateway.pool.failing()
    if len(failing) == channels:
        body = jsonify(
            status="unavailable",
            reason="every channel is failing",
            channels=channels,
            failing_channels=failing,
        )
        return body, 503
    return jsonify(status="ok", channels=channels, failing_channels=failing), 200
