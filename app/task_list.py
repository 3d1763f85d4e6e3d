"""A page of tasks in the shape both official SDKs read: 1.x's `data`, 2.x's `tasks`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from app.store import Task

# The times a task query's `output` carries, as DashScope writes them.
QUERY_TIMES = ("submit_time", "scheduled_time", "end_time")


def list_body(request_id: str, total: int, page: list[Task], page_no: int, page_size: int) -> str:
    """Return the JSON of a task-list page: DashScope's flat body plus `tasks`."""
    body = {
        "request_id": request_id,
        "total": total,
        "total_page": -(-total // page_size),
        "page_no": page_no,
        "page_size": page_size,
        "data": [data_entry(task) for task in page],
        # SDK 2.x's JobList reads its entries from `tasks` and parses each as a task query's
        # answer (times as strings): `data`'s epoch integers would fail its validation.
        "tasks": [task_entry(task) for task in page],
    }
    return json.dumps(body)


def data_entry(task: Task) -> dict[str, Any]:
    """Return a task as DashScope's task list has it: epoch milliseconds."""
    return {
        "task_id": task.task_id,
        "status": task.status,
        "model_name": task.model,
        "api_key_id": str(task.key_id),
        "gmt_create": epoch_ms(task.submitted_at),
        "end_time": epoch_ms(task.finished_at) if task.finished_at else None,
    }


def task_entry(task: Task) -> dict[str, Any]:
    """Return a task with the fields and types of its query's `output`."""
    entry: dict[str, Any] = {
        "task_id": task.task_id,
        "task_status": task.status,
        "model_name": task.model,
        "api_key_id": str(task.key_id),
    }
    # DashScope's own times, from its last answer, so the list says what a query says; the
    # gateway's (UTC) only where DashScope has not said yet (a task never queried).
    known = upstream_times(task.upstream_body)
    entry["submit_time"] = known.get("submit_time") or query_time(task.submitted_at)
    if "scheduled_time" in known:
        entry["scheduled_time"] = known["scheduled_time"]
    if task.finished_at is not None:
        entry["end_time"] = known.get("end_time") or query_time(task.finished_at)
    return entry


def upstream_times(upstream_body: str) -> dict[str, str]:
    """Return the string times in a stored answer's `output`."""
    try:
        output = json.loads(upstream_body).get("output")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(output, dict):
        return {}
    return {name: output[name] for name in QUERY_TIMES if isinstance(output.get(name), str)}


def query_time(moment: datetime) -> str:
    """Return a naive time as a task query writes times: `YYYY-MM-DD HH:MM:SS.mmm`."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def epoch_ms(moment: datetime) -> int:
    """Return a naive UTC time as epoch milliseconds."""
    return int(moment.replace(tzinfo=UTC).timestamp() * 1000)
