"""The OpenAPI document of the compatibility routes, served without a key."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from app.openapi import openapi_document

bp = Blueprint("docs", __name__)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """Serve the OpenAPI document; it is public, like DashScope's own API reference."""
    return jsonify(openapi_document(current_app))
