"""Paid work: submissions written ahead, recorded whatever the database does, reconciled."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.reconcile import Reconciler
from app.store import find_caller, hash_secret, utcnow
from app.store.leases import acquire_lease
from app.store.submissions import write_ahead
from app.store.tables import ledger, submissions, task_archive, tasks
from tests.conftest import BASE_CONFIG, PRIMARY, SUBMIT_PATH, bearer, new_key
from tests.test_metrics import Meter

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_LIST = f"{PRIMARY}/api/v1/tasks"
MODEL = "wan2.5-t2v-preview"
BODY = {"model": MODEL, "input": {"prompt": "a cat"}, "parameters": {"duration": 5}}
RAW_BODY = json.dumps(BODY).encode()
# Past the reconciler's grace for answers still on their way (connect + read + retries + 5 s).
LATER = timedelta(minutes=1)
# Past the adoption window (300 s by default) and DashScope's clock skew.
MUCH_LATER = timedelta(minutes=10)
FAST_RETRIES = BASE_CONFIG.replace("[tasks]", "[tasks]\nrecord_retry_seconds = 0.3")


def accepted(task_id: str) -> dict[str, Any]:
    """Return DashScope's answer to an accepted submit."""
    return {
        "request_id": f"req-{task_id}",
        "output": {"task_id": task_id, "task_status": "PENDING"},
    }


def rows(app: Flask, table: Any) -> list[Any]:
    """Return every row of a table."""
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(table)).all()


def post_submit(app: Flask, key: str, body: bytes = RAW_BODY) -> Any:
    """Submit through the app's test client."""
    headers = {**bearer(key), "Content-Type": "application/json"}
    return app.test_client().post(SUBMIT_PATH, data=body, headers=headers)


def listing(*items: tuple[str, datetime]) -> dict[str, Any]:
    """Return DashScope's task list answer holding (task id, creation time) items."""
    data = [
        {
            "task_id": task_id,
            "status": "RUNNING",
            "model_name": MODEL,
            "gmt_create": int(created.replace(tzinfo=UTC).timestamp() * 1000),
        }
        for task_id, created in items
    ]
    return {"request_id": "r", "total": len(data), "page_no": 1, "page_size": 100, "data": data}


def reconciler(app: Flask, ahead: timedelta) -> Reconciler:
    """Return a reconciler whose clock runs `ahead` of the real one and that never sleeps."""
    return Reconciler(
        app.extensions["gateway"], clock=lambda: utcnow() + ahead, sleep=lambda _s: None
    )


@pytest.fixture
def sqlite_app(make_app: Any, tmp_path: Path) -> Any:
    """Return an app on an SQLite file in a folder of its own, which tests may move away."""
    folder = tmp_path / "db"
    folder.mkdir()

    def make(config: str = FAST_RETRIES) -> tuple[Flask, Path]:
        app = make_app(
            config,
            GATEWAY_DATABASE_URL=f"sqlite:///{folder / 'gateway.sqlite3'}",
        )
        return app, folder

    return make


def move_database_away(app: Flask, folder: Path) -> Path:
    """Make the SQLite database unreachable: its folder moved, the pool's connections closed."""
    app.extensions["gateway"].engine.dispose()
    away = folder.with_name("db-away")
    shutil.move(folder, away)
    return away


# --------------------------------------------------------------------------- written ahead


def test_the_submission_is_written_before_dashscope_is_called(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    seen: list[Any] = []

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.extend(rows(app, submissions))
        return 200, {}, json.dumps(accepted("t-1"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)

    assert post_submit(app, api_key).status_code == 200

    [before] = seen
    assert before.state == "in_flight"
    assert (before.model, before.channel) == (MODEL, "primary")
    assert before.service_path == "services/aigc/video-generation/video-synthesis"
    assert before.body_sha256 == hashlib.sha256(RAW_BODY).hexdigest()
    assert before.task_id is None
    [after] = rows(app, submissions)
    assert (after.id, after.state, after.task_id, after.resolved_by) == (
        before.id,
        "accepted",
        "t-1",
        "answer",
    )
    [task] = rows(app, tasks)
    assert (task.task_id, task.account_id, task.key_id) == ("t-1", after.account_id, after.key_id)


def test_a_database_that_cannot_be_written_gets_503_and_dashscope_is_never_called(
    sqlite_app: Any, upstream: responses.RequestsMock
) -> None:
    app, folder = sqlite_app()
    key = new_key(app)
    # The key is cached now: authentication does not need the database.
    assert app.test_client().get("/alibailian/api/v1/tasks/x", headers=bearer(key)).status_code
    move_database_away(app, folder)

    response = post_submit(app, key)

    assert response.status_code == 503
    assert response.json["code"] == "ServiceUnavailable"
    assert "nothing was sent" in response.json["message"]
    assert len(upstream.calls) == 0


def test_an_answer_that_created_nothing_resolves_the_submission(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    refusal = {"request_id": "r", "code": "DataInspectionFailed", "message": "m"}
    upstream.post(UPSTREAM_SUBMIT, status=400, json=refusal)

    assert post_submit(app, api_key).status_code == 400

    [row] = rows(app, submissions)
    assert (row.state, row.task_id, row.resolved_by) == ("not_created", None, "answer")


def test_failover_records_the_channel_that_was_sent_to_before_each_attempt(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    config = BASE_CONFIG.replace(
        'models = ["wan2.2-t2v-plus"]', f'models = ["wan2.2-t2v-plus", "{MODEL}"]'
    ).replace('name = "primary"', 'name = "primary"\npriority = 10')
    app = make_app(config)
    key = new_key(app)
    channels: list[str] = []

    def broken(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        channels.extend(row.channel for row in rows(app, submissions))
        return 500, {}, json.dumps({"request_id": "r", "code": "InternalError", "message": "m"})

    def intl(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        channels.extend(row.channel for row in rows(app, submissions))
        return 200, {}, json.dumps(accepted("t-intl"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=broken)
    upstream.add_callback(
        responses.POST,
        "https://dashscope-intl.test/api/v1/services/aigc/video-generation/video-synthesis",
        callback=intl,
    )

    assert post_submit(app, key).status_code == 200

    assert channels == ["primary", "intl"]
    [row] = rows(app, submissions)
    assert (row.channel, row.state, row.task_id) == ("intl", "accepted", "t-intl")


def test_a_timeout_after_sending_stays_in_flight_and_tells_clients_not_to_resend(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout("slow"))

    response = post_submit(app, api_key)

    assert (response.status_code, response.json["code"]) == (504, "RequestTimeOut")
    assert response.headers["x-should-retry"] == "false"
    [row] = rows(app, submissions)
    assert (row.state, row.task_id) == ("in_flight", None)


def test_an_unreachable_upstream_created_nothing_and_may_be_retried(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, body=requests.ConnectTimeout("no connection"))

    response = post_submit(app, api_key)

    assert response.status_code == 503
    assert "x-should-retry" not in response.headers
    [row] = rows(app, submissions)
    assert row.state == "not_created"


# --------------------------------------------------------------------------- recorded after


def test_a_database_that_comes_back_within_the_retry_time_records_the_task(
    sqlite_app: Any, upstream: responses.RequestsMock
) -> None:
    app, folder = sqlite_app(BASE_CONFIG.replace("[tasks]", "[tasks]\nrecord_retry_seconds = 20"))
    key = new_key(app)

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        away = move_database_away(app, folder)
        threading.Timer(0.5, shutil.move, (away, folder)).start()
        return 200, {}, json.dumps(accepted("t-late"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)

    assert post_submit(app, key).status_code == 200

    assert [row.task_id for row in rows(app, tasks)] == ["t-late"]
    assert app.extensions["gateway"].journal.lines() == 0


def test_a_task_the_database_refuses_is_journaled_answered_and_replayed_once(
    sqlite_app: Any, upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    app, folder = sqlite_app()
    key = new_key(app)
    away: list[Path] = []

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        away.append(move_database_away(app, folder))
        return 200, {}, json.dumps(accepted("t-journaled"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)
    caplog.set_level(logging.INFO)
    meter = Meter(app.test_client())

    response = post_submit(app, key)

    assert response.status_code == 200
    assert response.json["output"]["task_id"] == "t-journaled"
    assert meter.read().delta("bailian_gateway_journal_lines_total", event="written") == 1
    journal = app.extensions["gateway"].journal
    assert journal.lines() == 1
    [line] = [r for r in caplog.records if r.getMessage() == "task journaled"]
    assert (line.task_id, line.channel) == ("t-journaled", "primary")
    readiness = app.test_client().get("/readyz")
    assert readiness.status_code == 503
    assert readiness.json["journal_lines"] == 1

    shutil.move(away[0], folder)
    # The same line twice: a replay that stopped after applying it, then ran again.
    Path(journal.path).write_text(Path(journal.path).read_text() * 2)
    first = reconciler(app, timedelta(0)).run_pass()
    second = reconciler(app, timedelta(0)).run_pass()

    assert (first.replayed, second.replayed) == (2, 0)
    assert journal.lines() == 0
    assert meter.read().delta("bailian_gateway_journal_lines_total", event="replayed") == 2
    assert meter.delta("bailian_gateway_reconciler_passes_total", outcome="ok") == 2
    [task] = rows(app, tasks)
    [submission] = rows(app, submissions)
    assert (task.task_id, task.account_id) == ("t-journaled", submission.account_id)
    assert (submission.state, submission.task_id, submission.resolved_by) == (
        "accepted",
        "t-journaled",
        "journal",
    )
    assert any(line.startswith("journal replayed task_id=t-journaled") for line in first.lines)
    query = app.test_client().get("/alibailian/api/v1/tasks?page_size=10", headers=bearer(key))
    assert [item["task_id"] for item in query.json["data"]] == ["t-journaled"]


def test_a_journal_replayed_into_a_restored_database_keeps_owner_and_charges_once(
    sqlite_app: Any, upstream: responses.RequestsMock
) -> None:
    # The database is restored from a backup taken before a journaled submit: the journal's
    # submission id is free again, and the next submit (another account's) takes it.
    app, folder = sqlite_app()
    key_a, key_b = new_key(app, "team-a"), new_key(app, "team-b")
    app.extensions["gateway"].engine.dispose()
    backup = folder.with_name("db-backup")
    shutil.copytree(folder, backup)
    away: list[Path] = []

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        away.append(move_database_away(app, folder))
        return 200, {}, json.dumps(accepted("t-of-a"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)
    assert post_submit(app, key_a).status_code == 200
    assert app.extensions["gateway"].journal.lines() == 1
    shutil.copytree(backup, folder)
    upstream.replace(responses.POST, UPSTREAM_SUBMIT, json=accepted("t-of-b"))
    assert post_submit(app, key_b).status_code == 200
    [b_submission] = rows(app, submissions)
    journaled = json.loads(Path(app.extensions["gateway"].journal.path).read_text())
    assert journaled["submission_id"] == b_submission.id  # the id names b's submission now

    assert reconciler(app, timedelta(0)).run_pass().replayed == 1

    owners = {task.task_id: task.account_id for task in rows(app, tasks)}
    by_task = {row.task_id: row for row in rows(app, submissions)}
    assert owners["t-of-b"] == b_submission.account_id
    assert owners["t-of-a"] == by_task["t-of-a"].account_id != b_submission.account_id
    assert by_task["t-of-a"].billing_state == "reserved"
    assert by_task["t-of-a"].estimate == Decimal("1.5")  # 5 s at 480P, 0.3 a second
    assert by_task["t-of-b"].id == b_submission.id
    foreign = app.test_client().get("/alibailian/api/v1/tasks/t-of-a", headers=bearer(key_b))
    assert foreign.json["code"] == "task_not_exist"

    done = {
        "request_id": "q",
        "output": {"task_id": "t-of-a", "task_status": "SUCCEEDED", "video_url": "u"},
        "usage": {"duration": 4.5, "SR": 480},
    }
    upstream.get(f"{UPSTREAM_LIST}/t-of-a", json=done)
    mine = app.test_client().get("/alibailian/api/v1/tasks/t-of-a", headers=bearer(key_a))
    assert mine.json["output"]["task_status"] == "SUCCEEDED"
    reconciler(app, LATER).run_pass()  # the catch-up finds nothing more to settle

    charges = [row for row in rows(app, ledger) if row.kind == "charge"]
    assert [(row.task_id, row.amount) for row in charges] == [("t-of-a", Decimal("1.35"))]
    of_a = by_task["t-of-a"].id
    assert [row.kind for row in rows(app, ledger) if row.submission_id == of_a] == [
        "reserve",
        "charge",
        "release",
    ]


def test_sql_parameters_never_reach_an_error_message(app: Flask) -> None:
    engine = app.extensions["gateway"].engine
    with pytest.raises(IntegrityError) as raised, engine.begin() as conn:
        conn.execute(tasks.insert().values(task_id="t"))  # NOT NULL columns missing
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(raised.value)


def test_a_database_error_in_a_request_is_a_503_logged_by_its_kind_only(
    sqlite_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app, folder = sqlite_app()
    key = new_key(app)
    client = app.test_client()
    assert client.get("/alibailian/api/v1/tasks/x", headers=bearer(key)).status_code == 400
    move_database_away(app, folder)

    response = client.get("/alibailian/api/v1/tasks", headers=bearer(key))

    assert (response.status_code, response.json["code"]) == (503, "ServiceUnavailable")
    [record] = [r for r in caplog.records if r.getMessage().startswith("database error")]
    assert record.getMessage() == "database error: OperationalError"
    assert record.exc_info is None


# --------------------------------------------------------------------------- the reconciler


def leave_in_flight(app: Flask, key: str, upstream: responses.RequestsMock) -> None:
    """Submit once with an upstream that times out, so the submission stays in flight."""
    upstream.post(UPSTREAM_SUBMIT, body=requests.ReadTimeout("slow"))
    assert post_submit(app, key).status_code == 504


def test_the_reconciler_adopts_the_task_of_a_submission_left_in_flight(
    app: Flask, api_key: str, upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    leave_in_flight(app, api_key, upstream)
    [submission] = rows(app, submissions)
    created = submission.sent_at + timedelta(seconds=3)
    listed = upstream.get(UPSTREAM_LIST, json=listing(("t-adopted", created)))
    upstream.get(
        f"{UPSTREAM_LIST}/t-adopted",
        json={"request_id": "q", "output": {"task_id": "t-adopted", "task_status": "RUNNING"}},
    )
    caplog.set_level(logging.INFO)
    meter = Meter(app.test_client())

    report = reconciler(app, LATER).run_pass()

    assert report.adopted == 1
    assert meter.read().delta("bailian_gateway_tasks_adopted_total", channel="primary") == 1
    assert meter.after[("bailian_gateway_submissions_unresolved", frozenset())] == 0
    [task] = rows(app, tasks)
    assert (task.task_id, task.account_id, task.status) == (
        "t-adopted",
        submission.account_id,
        "RUNNING",
    )
    [resolved] = rows(app, submissions)
    assert (resolved.state, resolved.resolved_by) == ("accepted", "reconciler")
    params = listed.calls[0].request.params
    assert params["model_name"] == MODEL
    # DashScope's listing speaks Beijing time.
    beijing = submission.sent_at + timedelta(hours=8)
    assert params["start_time"] <= beijing.strftime("%Y%m%d%H%M%S") <= params["end_time"]
    [line] = [r for r in caplog.records if r.getMessage() == "task adopted"]
    assert (line.task_id, line.channel) == ("t-adopted", "primary")
    # A second pass finds nothing left to do.
    assert reconciler(app, LATER).run_pass().adopted == 0


def test_a_submission_whose_window_holds_no_task_created_nothing(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    leave_in_flight(app, api_key, upstream)
    upstream.get(UPSTREAM_LIST, json=listing())

    early = reconciler(app, LATER).run_pass()
    assert (early.adopted, early.not_created) == (0, 0)  # DashScope may still create it
    assert rows(app, submissions)[0].state == "in_flight"

    late = reconciler(app, MUCH_LATER).run_pass()
    assert late.not_created == 1
    assert rows(app, submissions)[0].state == "not_created"
    assert rows(app, tasks) == []


def test_a_task_another_account_could_have_created_is_never_guessed(
    app: Flask, upstream: responses.RequestsMock
) -> None:
    # Two accounts' submits of the same model on the same channel, left in flight together.
    gateway = app.extensions["gateway"]
    sent = utcnow()
    for account in ("alice", "bob"):
        caller = find_caller(gateway.engine, hash_secret(new_key(app, account)))
        write_ahead(
            gateway.engine,
            account_id=caller.account_id,
            key_id=caller.key_id,
            model=MODEL,
            channel="primary",
            service_path="services/aigc/video-generation/video-synthesis",
            body_sha256="0" * 64,
            now=sent,
        )
    first = rows(app, submissions)[0]
    upstream.get(UPSTREAM_LIST, json=listing(("t-whose", first.sent_at + timedelta(seconds=1))))

    assert reconciler(app, LATER).run_pass().adopted == 0
    reconciler(app, MUCH_LATER).run_pass()

    assert rows(app, tasks) == []
    assert {row.state for row in rows(app, submissions)} == {"ambiguous"}


def test_one_reconciler_at_a_time_holds_the_lease(app: Flask) -> None:
    gateway = app.extensions["gateway"]
    assert acquire_lease(gateway.engine, "reconciler", "another-instance", utcnow(), 60)

    report = reconciler(app, timedelta(0)).run_pass()

    assert report.skipped
    assert report.summary() == "reconcile: skipped, another reconciler holds the lease"


def test_running_tasks_nobody_polls_are_refreshed_by_the_reconciler(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("refresh_interval = 0", "refresh_interval = 5"))
    key = new_key(app)
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-unpolled"))
    assert post_submit(app, key).status_code == 200
    done = {
        "request_id": "q",
        "output": {"task_id": "t-unpolled", "task_status": "SUCCEEDED", "video_url": "u"},
        "usage": {"duration": 5, "SR": 480},
    }
    upstream.get(f"{UPSTREAM_LIST}/t-unpolled", json=done)

    assert reconciler(app, timedelta(0)).run_pass().refreshed == 0  # refreshed 0 s ago
    assert reconciler(app, LATER).run_pass().refreshed == 1

    listed = app.test_client().get("/alibailian/api/v1/tasks", headers=bearer(key))
    assert [item["status"] for item in listed.json["data"]] == ["SUCCEEDED"]


def test_tasks_past_retention_leave_the_hot_table_for_the_archive(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(BASE_CONFIG.replace("[tasks]", "[tasks]\nretention_hours = 1"))
    key = new_key(app)
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-old"))
    assert post_submit(app, key).status_code == 200
    done = {
        "request_id": "q",
        "output": {"task_id": "t-old", "task_status": "SUCCEEDED"},
        "usage": {"duration": 5, "SR": 720},
    }
    upstream.get(f"{UPSTREAM_LIST}/t-old", json=done)
    assert (
        app.test_client()
        .get("/alibailian/api/v1/tasks/t-old", headers=bearer(key))
        .json["output"]["task_status"]
        == "SUCCEEDED"
    )

    report = reconciler(app, timedelta(hours=2)).run_pass()

    assert report.archived == 1
    assert rows(app, tasks) == []
    assert rows(app, submissions) == []
    [archived] = rows(app, task_archive)
    assert (archived.task_id, archived.status) == ("t-old", "SUCCEEDED")
    assert json.loads(archived.usage) == {"duration": 5, "SR": 720}


def test_bailian_gateway_reconcile_prints_what_it_did(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    result = app.test_cli_runner().invoke(args=["reconcile"])

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        "reconcile: 0 replayed, 0 adopted, 0 created nothing, 0 refreshed, 0 settled, 0 archived"
    )


def test_readyz_reports_the_journal_only_when_it_holds_lines(app: Flask) -> None:
    assert "journal_lines" not in app.test_client().get("/readyz").json
    app.extensions["gateway"].journal.append({"task_id": "t"})
    assert app.test_client().get("/readyz").json["journal_lines"] == 1
