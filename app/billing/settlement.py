"""Settling finished tasks: whoever sees the final status first settles, exactly once."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.billing.ledger import SETTLING_STATUSES, Settlement, settle_task
from app.billing.prices import to_cent
from app.gateway import Gateway
from app.observability import metrics

log = logging.getLogger(__name__)


def settle(
    gateway: Gateway, task_id: str, status: str, usage: Any, *, strict: bool = False
) -> Settlement | None:
    """Settle a task that reached a final status; None if it was settled already or failed.

    With `strict`, a database failure is raised (after the log line) instead of returned as
    None: the caller must know to try again.
    """
    if status not in SETTLING_STATUSES:
        return None
    try:
        done = settle_task(
            gateway.engine, task_id, status, usage, gateway.settings.pricing, gateway.clock()
        )
    except SQLAlchemyError as exc:
        # Harmless: the reservation stays held, and the reconciler's catch-up settles it.
        log.warning("task not settled: %s", type(exc).__name__, extra={"task_id": task_id})
        if strict:
            raise
        return None
    if done is None:
        return None
    offered = gateway.settings.offered_models
    metrics.charged.labels(metrics.label_from(done.model, offered)).inc(float(done.charged))
    log.info(
        "task settled",
        extra={
            "task_id": task_id,
            "status": status,
            "charged": to_cent(done.charged),
            "released": to_cent(done.released),
        },
    )
    return done
