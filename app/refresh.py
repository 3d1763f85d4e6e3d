"""Refreshing a running task: ask its own channel, store what changed, count the change."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.billing.ledger import Settlement
from app.billing.settlement import settle
from app.config import Channel
from app.gateway import Gateway
from app.observability import metrics
from app.store import Task, record_answer
from app.store.tables import FINAL_STATUSES
from app.upstream import UpstreamAnswer, UpstreamError, UpstreamThrottled

log = logging.getLogger(__name__)


# Why a task's last stored answer is served instead of a fresh one (X-Gateway-Stale).
STALE_UNREACHABLE = "upstream_unreachable"
STALE_ERROR = "upstream_error"


def refresh_task(
    gateway: Gateway,
    channel: Channel,
    task: Task,
    on_settled: Callable[[Settlement], None] | None = None,
) -> UpstreamAnswer | str:
    """Ask the task's channel about it, store what changed, settle it if it finished.

    When it could not, say why (STALE_UNREACHABLE or STALE_ERROR).
    """
    try:
        answer = gateway.client.query_task(channel, task.task_id)
    except UpstreamError as exc:
        log.warning("task refresh failed, serving the last known status: %s", exc)
        throttled = isinstance(exc, UpstreamThrottled)
        gateway.pool.record_call(channel, failed=not throttled)
        return STALE_ERROR if throttled else STALE_UNREACHABLE
    # The channel's key refused, or DashScope's own fault: the channel does not work.
    gateway.pool.record_call(channel, failed=answer.status in (401, 403) or answer.status >= 500)
    if answer.status != 200 or answer.task_status is None:
        # A channel fault (throttled, key refused, 5xx) is not the client's: the last known
        # status is the better answer.
        log.warning(
            "task refresh answered HTTP %s%s, serving the last known status",
            answer.status,
            " without a task status DashScope writes" if answer.status == 200 else "",
            extra={"channel": channel.name},
        )
        return STALE_ERROR
    usage = answer.data.get("usage")
    # A task whose reservation was released while DashScope said UNKNOWN holds none, so the
    # catch-up (which settles the reservations held) would never charge it: its final status
    # is settled before it is stored, and a settlement that fails leaves the task UNKNOWN in
    # the store, for the next refresh to settle.
    settle_first = task.status == "UNKNOWN" and answer.task_status in FINAL_STATUSES
    settled = None
    if settle_first:
        try:
            settled = settle(gateway, task.task_id, answer.task_status, usage, strict=True)
        except SQLAlchemyError:
            return STALE_ERROR
    if answer_changed(task, answer):
        record_answer(
            gateway.engine, task.task_id, answer.task_status, answer.body.decode(), gateway.clock()
        )
    if answer.task_status != task.status:
        count_transition(task.status, answer.task_status)
    if not settle_first:
        # Recorded first: the charge is made from what the store holds (and the catch-up
        # would find it there if this settlement failed).
        settled = settle(gateway, task.task_id, answer.task_status, usage)
    if settled is not None and on_settled is not None:
        on_settled(settled)
    return answer


def answer_changed(task: Task, answer: UpstreamAnswer) -> bool:
    """Return whether the answer says more than the stored one (request ids aside)."""
    # Most refreshes of a running task repeat the last answer; skipping those writes keeps
    # the database free for the ones that matter.
    return progress_of(task.upstream_body) != (answer.data.get("output"), answer.data.get("usage"))


@lru_cache(maxsize=1024)
def progress_of(upstream_body: str) -> tuple[Any, Any]:
    """Return a stored answer's `output` and `usage`: what a refresh may change."""
    # A running task's stored answer is compared with every refresh until it changes: it is
    # decoded once, not on each of them (1% of a running task's query).
    body = json.loads(upstream_body)
    return body.get("output"), body.get("usage")


def count_transition(before: str, after: str) -> None:
    """Count a task status change the gateway recorded."""
    metrics.task_transitions.labels(
        before if before == metrics.NEW_TASK else metrics.task_status_label(before),
        metrics.task_status_label(after),
    ).inc()
