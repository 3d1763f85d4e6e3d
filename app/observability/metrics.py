"""The gateway's Prometheus metrics: definitions and the label vocabulary they may use."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

import prometheus_client
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

# Every label value comes from a fixed set (route names, configured channels and models,
# HTTP methods and statuses, the names below): a client must never be able to mint a series.
OTHER = "other"
UNMATCHED_ROUTE = "unmatched"
NO_STATUS = "none"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TASK_STATUSES = frozenset(
    {"PENDING", "RUNNING", "SUSPENDED", "SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"}
)
# The "from" status of a task the gateway has just recorded (its submit).
NEW_TASK = "NEW"


class _KeptChildren(MetricWrapperBase):
    """A metric that hands out each label set's child from a dict once it has been made."""

    # prometheus_client checks the values and takes a lock on every .labels() call: 2.5% of a
    # stored answer's CPU. The label values here come from fixed sets, so every child is
    # made once and kept (prometheus_client returns the same child for the same values).
    def labels(self: M, *labelvalues: Any, **labelkwargs: Any) -> M:
        """Return the child for these label values."""
        if labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)
        kept: dict[tuple[Any, ...], M] = self.__dict__.setdefault("_kept_children", {})
        child = kept.get(labelvalues)
        if child is None:
            child = kept[labelvalues] = super().labels(*labelvalues)
        return child


class Counter(_KeptChildren, prometheus_client.Counter):
    """A prometheus_client Counter that keeps its children."""


class Histogram(_KeptChildren, prometheus_client.Histogram):
    """A prometheus_client Histogram that keeps its children."""


# Gateway answers are fast unless they wait on DashScope, whose read timeout defaults to 30 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

http_requests = Counter(
    "bailian_gateway_http_requests",
    "Requests answered by the gateway, by Flask endpoint, method and HTTP status.",
    ["route", "method", "status"],
)
http_request_duration = Histogram(
    "bailian_gateway_http_request_duration_seconds",
    "Time from routing a request to handing its response to the server, by Flask endpoint.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
upstream_requests = Counter(
    "bailian_gateway_upstream_requests",
    "Calls to DashScope, by channel, operation, outcome and HTTP status (none without one).",
    ["channel", "operation", "outcome", "status"],
)
upstream_request_duration = Histogram(
    "bailian_gateway_upstream_request_duration_seconds",
    "Duration of calls to DashScope (query retries included), by channel, operation, outcome.",
    ["channel", "operation", "outcome"],
    buckets=LATENCY_BUCKETS,
)
submits = Counter(
    "bailian_gateway_submits",
    "Submits DashScope answered, by model and the HTTP status of its answer.",
    ["model", "status"],
)
task_transitions = Counter(
    "bailian_gateway_task_transitions",
    "Task status changes the gateway recorded (from NEW on submit).",
    ["from_status", "to_status"],
)
task_queries = Counter(
    "bailian_gateway_task_queries",
    "Task queries answered, by source (store or upstream) and why that source.",
    ["source", "reason"],
)
channel_cooldowns = Counter(
    "bailian_gateway_channel_cooldowns",
    "Times a channel (or one model of it) was put to sit out, by reason: failure, throttled, auth.",
    ["channel", "reason"],
)

# Paid work: what the write-ahead submissions, the journal and the reconciler did.
submissions_in_flight = prometheus_client.Gauge(
    "bailian_gateway_submissions_in_flight",
    "Submits written ahead and sent to DashScope whose answer has not come back yet.",
    multiprocess_mode="livesum",
)
submissions_unresolved = prometheus_client.Gauge(
    "bailian_gateway_submissions_unresolved",
    "Submissions left in flight (no answer recorded) at the end of the last reconciler pass.",
    multiprocess_mode="mostrecent",
)
journal_lines = Counter(
    "bailian_gateway_journal_lines",
    "Accepted tasks the database refused, by what happened: written to the journal, replayed.",
    ["event"],
)
tasks_adopted = Counter(
    "bailian_gateway_tasks_adopted",
    "Tasks of submissions left in flight that the reconciler found upstream and recorded.",
    ["channel"],
)
reconciler_passes = Counter(
    "bailian_gateway_reconciler_passes",
    "Reconciler passes, by outcome: ok, error, or skipped (another holds the lease).",
    ["outcome"],
)
reconciler_errors = Counter(
    "bailian_gateway_reconciler_errors",
    "Steps of reconciler passes that failed, by step.",
    ["step"],
)


# Money: what was charged and held, in the configured currency (floats for Prometheus only;
# the ledger keeps the exact amounts).
charged = Counter(
    "bailian_gateway_charged",
    "Amount charged for finished tasks, in the configured currency, by model.",
    ["model"],
)
reservations_outstanding = prometheus_client.Gauge(
    "bailian_gateway_reservations_outstanding",
    "Amount reserved for submits not yet settled, every account, at the last reconciler pass.",
    multiprocess_mode="mostrecent",
)
limit_refusals = Counter(
    "bailian_gateway_limit_refusals",
    "Submits refused with Arrearage because their estimate did not fit the account's limit.",
    ["model"],
)


def label_from(value: str | None, allowed: Collection[str]) -> str:
    """Return the value if it belongs to the allowed set, else `other`."""
    return value if value is not None and value in allowed else OTHER


def method_label(method: str) -> str:
    """Return an HTTP method as a label value; methods no route serves are `other`."""
    return label_from(method, KNOWN_METHODS)


def task_status_label(status: str | None) -> str:
    """Return a task status as a label value; a status DashScope has not documented is `other`."""
    return label_from(status, TASK_STATUSES)
