"""Prometheus metrics, outside the compatibility prefix and without a key."""

from __future__ import annotations

import os

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    """Answer every metric in Prometheus' text format, summed over all worker processes."""
    return Response(generate_latest(_registry()), content_type=CONTENT_TYPE_LATEST)


def _registry() -> CollectorRegistry:
    # Under gunicorn (gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR) each worker writes its
    # own files and any worker answers for all of them; elsewhere one process holds everything.
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    return registry
