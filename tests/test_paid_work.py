"""Paid work: submissions written ahead, recorded whatever the database does, reconciled."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
from flask import Flask
from sqlalchemy import create_engine, make_url, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from app.reconcile import Reconciler
from app.store import find_caller, hash_secret, open_engine, utcnow
from app.store.engine import SQLITE_BUSY_TIMEOUT_MS
from app.store.leases import acquire_lease
from app.store.submissions import write_ahead
from app.store.tables import leases, ledger, submissions, task_archive, tasks
from tests.conftest import BASE_CONFIG, INTL, PRIMARY, SUBMIT_PATH, bearer, new_key
from tests.test_metrics import Meter

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
UPSTREAM_LIST = f"{PRIMARY}/api/v1/tasks"
MODEL = "wan2.5-t2v-preview"
BODY = {"model": MODEL, "input": {"prompt": "a cat"}, "parameters": {"duration": 5}}
RAW_BODY = json.dumps(BODY).encode()
# Past the reconciler's grace for answers still on their way (connect + read + retries + 5 s).
LATER = timedelta(minutes=1)
BEIJING = timedelta(hours=8)
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


# For the tests on an SQLite file of their own (sqlite_app): once, not again under the
# PostgreSQL parameter, which they would ignore.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


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


class PostgreSQLOfItsOwn:
    """A PostgreSQL database made for one test, and dropped after it.

    The other tests share database `test`: what this one does to its database (ALTER DATABASE,
    LOCK TABLE, terminating sessions) reaches no one else's.
    """

    def __init__(self, base_url: str) -> None:
        base = make_url(base_url)
        self.name = f"gw_{os.getpid()}_{secrets.token_hex(4)}"
        self.url = base.set(database=self.name).render_as_string(hide_password=False)
        self._admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))

    def refuse_writes(self) -> None:
        """Make the server refuse writes as a standby does after a failover: sessions dropped,
        and every new one read-only."""
        self._alter("SET default_transaction_read_only = on")
        self.drop_sessions()

    def allow_writes(self, *, drop_sessions: bool = True) -> None:
        """Take writes again; without `drop_sessions`, the read-only sessions opened meanwhile
        stay open (and read-only) until their clients reconnect."""
        self._alter("RESET default_transaction_read_only")
        if drop_sessions:
            self.drop_sessions()

    def drop_sessions(self) -> None:
        """Terminate every session of the database, waiting until each has gone."""
        with self._admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": self.name},
            )

    @contextmanager
    def locked(self, table: str, mode: str) -> Iterator[None]:
        """Hold `LOCK TABLE table IN mode MODE` in another session for the block."""
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text(f"LOCK TABLE {table} IN {mode} MODE"))
                try:
                    yield
                finally:
                    conn.rollback()
        finally:
            engine.dispose()

    def close(self) -> None:
        """Drop the database, whoever is still connected to it."""
        with self._admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()

    def _alter(self, setting: str) -> None:
        with self._admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.name}" {setting}'))


@contextmanager
def postgresql_of_its_own() -> Iterator[PostgreSQLOfItsOwn]:
    """Make a database of the test's own on the test PostgreSQL; skip the test without one."""
    base = os.environ.get("GATEWAY_TEST_DATABASE_URL")
    if not base:
        pytest.skip("GATEWAY_TEST_DATABASE_URL is not set")
    database = PostgreSQLOfItsOwn(base)
    try:
        yield database
    finally:
        database.close()


@dataclass
class Unwritable:
    """An app over a database of its own, which the test makes refuse writes and take them again.

    SQLite: the database's folder moved away (nothing can be read either) and back. PostgreSQL:
    the server turned read-only (reads still work), as after a failover to a standby, and back.
    """

    app: Flask
    refuse_writes: Callable[[], object]
    # drop_sessions=False (PostgreSQL): the sessions opened meanwhile stay, read-only.
    allow_writes: Callable[..., object]


@pytest.fixture
def unwritable_app(
    make_app: Any, database_url: str, tmp_path: Path
) -> Iterator[Callable[..., Unwritable]]:
    """Return a factory of apps over a database of their own that tests make refuse writes."""
    with ExitStack() as stack:

        def make(config: str = FAST_RETRIES) -> Unwritable:
            if database_url.startswith("sqlite"):
                folder = tmp_path / "db"
                folder.mkdir()
                app = make_app(
                    config, GATEWAY_DATABASE_URL=f"sqlite:///{folder / 'gateway.sqlite3'}"
                )
                stack.callback(app.extensions["gateway"].engine.dispose)
                away = folder.with_name("db-away")
                return Unwritable(
                    app,
                    refuse_writes=lambda: move_database_away(app, folder),
                    allow_writes=lambda **_ignored: shutil.move(away, folder),
                )
            database = stack.enter_context(postgresql_of_its_own())
            app = make_app(config, GATEWAY_DATABASE_URL=database.url)
            stack.callback(app.extensions["gateway"].engine.dispose)
            return Unwritable(app, database.refuse_writes, database.allow_writes)

        yield make


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
    unwritable_app: Callable[..., Unwritable], upstream: responses.RequestsMock
) -> None:
    database = unwritable_app()
    app = database.app
    key = new_key(app)
    # The key is cached now: authentication does not need the database.
    assert app.test_client().get("/alibailian/api/v1/tasks/x", headers=bearer(key)).status_code
    database.refuse_writes()

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
    unwritable_app: Callable[..., Unwritable], upstream: responses.RequestsMock
) -> None:
    database = unwritable_app(BASE_CONFIG.replace("[tasks]", "[tasks]\nrecord_retry_seconds = 20"))
    app = database.app
    key = new_key(app)
    # On PostgreSQL the read-only sessions the retries opened stay open: each retry must find
    # a session of its own, not the pool's read-only one again (a read-only error counts as a
    # lost connection), and the first one after the database came back writes.
    back = threading.Timer(0.5, database.allow_writes, kwargs={"drop_sessions": False})

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        database.refuse_writes()
        back.start()
        return 200, {}, json.dumps(accepted("t-late"))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)

    response = post_submit(app, key)
    back.join()

    assert response.status_code == 200
    assert [row.task_id for row in rows(app, tasks)] == ["t-late"]
    assert app.extensions["gateway"].journal.lines() == 0


def test_a_task_the_database_refuses_is_journaled_answered_and_replayed_once(
    unwritable_app: Callable[..., Unwritable],
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = unwritable_app()
    app = database.app
    key = new_key(app)

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        database.refuse_writes()
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

    database.allow_writes()
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


# A backup restored by copying the SQLite file back: the same on PostgreSQL would be a dump.
@SQLITE_ONLY
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


def test_postgresql_sessions_wait_for_a_lock_as_long_as_sqlite_and_keep_the_urls_options() -> None:
    with postgresql_of_its_own() as database:
        url = make_url(database.url).update_query_dict({"options": "-csearch_path=elsewhere"})
        engine = open_engine(url.render_as_string(hide_password=False), upgrade=False)
        try:
            with engine.connect() as conn:
                lock_timeout = conn.execute(text("SHOW lock_timeout")).scalar_one()
                search_path = conn.execute(text("SHOW search_path")).scalar_one()
        finally:
            engine.dispose()

    assert (lock_timeout, search_path) == (f"{SQLITE_BUSY_TIMEOUT_MS // 1000}s", "elsewhere")


def test_sql_parameters_never_reach_an_error_message(app: Flask) -> None:
    engine = app.extensions["gateway"].engine
    with pytest.raises(IntegrityError) as raised, engine.begin() as conn:
        conn.execute(tasks.insert().values(task_id="t"))  # NOT NULL columns missing
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(raised.value)


@SQLITE_ONLY  # a database that cannot be read either: its file gone
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


@dataclass(frozen=True)
class SentAhead:
    """A submission written ahead and left in flight, and whose it is."""

    id: int
    account_id: int


def sent_ahead(
    app: Flask,
    account: str,
    sent: datetime,
    prompt: str | None = None,
    *,
    channel: str = "primary",
    model: str = MODEL,
) -> SentAhead:
    """Write a submission ahead, as a submit whose answer never came back leaves it."""
    gateway = app.extensions["gateway"]
    caller = find_caller(gateway.engine, hash_secret(new_key(app, account)))
    assert caller is not None
    body = {"model": model, "input": {"prompt": prompt or ""}}
    # As the gateway keeps it: a SHA-256 of the prompt's UTF-8, to compare with DashScope's echo.
    prompt_sha256 = None if prompt is None else hashlib.sha256(prompt.encode()).hexdigest()
    submission_id, _ = write_ahead(
        gateway.engine,
        account_id=caller.account_id,
        key_id=caller.key_id,
        model=model,
        channel=channel,
        service_path="services/aigc/video-generation/video-synthesis",
        body_sha256=hashlib.sha256(json.dumps(body).encode()).hexdigest(),
        now=sent,
        prompt_sha256=prompt_sha256,
    )
    return SentAhead(submission_id, caller.account_id)


def task_answer(task_id: str, status: str = "RUNNING", prompt: str = "") -> dict[str, Any]:
    """Return DashScope's answer to a task query; a SUCCEEDED one echoes the prompt."""
    output: dict[str, Any] = {"task_id": task_id, "task_status": status}
    answer: dict[str, Any] = {"request_id": "q", "output": output}
    if status == "SUCCEEDED":
        output.update(video_url="u", orig_prompt=prompt)
        answer["usage"] = {"duration": 5, "SR": 480}
    return answer


TASK_QUERY = re.compile(rf"{re.escape(UPSTREAM_LIST)}/[^/?]+$")


class FakeListing:
    """DashScope's task list over (task id, creation time) items: filtered, paged, a day at most."""

    def __init__(self, items: list[tuple[str, datetime]]) -> None:
        self.items = sorted(items, key=lambda item: item[1], reverse=True)
        self.windows: list[tuple[datetime, datetime]] = []

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        """Answer one listing call as DashScope would."""
        params = dict(parse_qsl(urlsplit(str(request.url)).query))
        start, end = (
            datetime.strptime(params[name], "%Y%m%d%H%M%S") - BEIJING
            for name in ("start_time", "end_time")
        )
        self.windows.append((start, end))
        if end - start > timedelta(hours=24):
            refusal = {"request_id": "r", "code": "InvalidParameter", "message": "over 24 hours"}
            return 400, {}, json.dumps(refusal)
        inside = [item for item in self.items if start <= item[1] < end + timedelta(seconds=1)]
        page_no, page_size = int(params["page_no"]), int(params["page_size"])
        body = listing(*inside[(page_no - 1) * page_size : page_no * page_size])
        body.update(total=len(inside), page_no=page_no, page_size=page_size)
        return 200, {}, json.dumps(body)


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


def test_a_task_another_account_could_have_created_with_the_same_prompt_is_never_guessed(
    app: Flask, upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    # Two accounts' submits of the same prompt and model on the same channel, left in flight
    # together: nothing DashScope says of the task tells whose it is.
    sent = utcnow()
    sent_ahead(app, "alice", sent, "a cat")
    sent_ahead(app, "bob", sent, "a cat")
    upstream.get(UPSTREAM_LIST, json=listing(("t-whose", sent + timedelta(seconds=1))))
    upstream.get(f"{UPSTREAM_LIST}/t-whose", json=task_answer("t-whose", "SUCCEEDED", "a cat"))
    caplog.set_level(logging.INFO)

    assert reconciler(app, LATER).run_pass().adopted == 0
    assert {row.state for row in rows(app, submissions)} == {"in_flight"}
    reconciler(app, MUCH_LATER).run_pass()

    assert rows(app, tasks) == []
    assert {row.state for row in rows(app, submissions)} == {"ambiguous"}
    flagged = [r for r in caplog.records if r.getMessage().startswith("adoption ambiguous")]
    assert len(flagged) == 2


def test_a_submission_left_to_an_operator_still_contests_the_tasks_of_its_window(
    app: Flask, upstream: responses.RequestsMock
) -> None:
    # Alice's window closes first; Bob's, 100 s later, holds the same task: a later pass must
    # not hand it to Bob because Alice's submission is no longer in flight.
    sent = utcnow()
    alice = sent_ahead(app, "alice", sent, "a cat")
    bob = sent_ahead(app, "bob", sent + timedelta(seconds=100), "a cat")
    upstream.get(UPSTREAM_LIST, json=listing(("t-whose", sent + timedelta(seconds=101))))
    upstream.get(f"{UPSTREAM_LIST}/t-whose", json=task_answer("t-whose", "SUCCEEDED", "a cat"))

    reconciler(app, timedelta(seconds=320)).run_pass()
    states = {row.id: row.state for row in rows(app, submissions)}
    assert states == {alice.id: "ambiguous", bob.id: "in_flight"}
    reconciler(app, MUCH_LATER).run_pass()

    assert rows(app, tasks) == []
    assert {row.id: row.state for row in rows(app, submissions)} == {
        alice.id: "ambiguous",
        bob.id: "ambiguous",
    }


def test_two_accounts_lost_answers_in_one_window_are_told_apart_by_their_prompts(
    app: Flask, upstream: responses.RequestsMock
) -> None:
    # A worker serving both accounts was killed mid-submit: two answers lost at once.
    sent = utcnow()
    alice = sent_ahead(app, "alice", sent, "a cat")
    bob = sent_ahead(app, "bob", sent, "a dog")
    dashscope = FakeListing(
        [("t-dog", sent + timedelta(seconds=1)), ("t-cat", sent + timedelta(seconds=2))]
    )
    upstream.add_callback(responses.GET, UPSTREAM_LIST, callback=dashscope.answer)
    prompts = {"t-cat": "a cat", "t-dog": "a dog"}
    finished: list[bool] = []

    def query(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        task_id = str(request.url).rsplit("/", 1)[1]
        status = "SUCCEEDED" if finished else "RUNNING"
        return 200, {}, json.dumps(task_answer(task_id, status, prompts[task_id]))

    upstream.add_callback(responses.GET, TASK_QUERY, callback=query)

    early = reconciler(app, LATER).run_pass()
    late = reconciler(app, MUCH_LATER).run_pass()
    # Running tasks echo no prompt yet: past the window, still no guess and no giving up.
    assert (early.adopted, late.adopted, late.not_created) == (0, 0, 0)
    assert {row.state for row in rows(app, submissions)} == {"in_flight"}
    finished.append(True)
    done = reconciler(app, MUCH_LATER).run_pass()

    assert done.adopted == 2
    owners = {task.task_id: task.account_id for task in rows(app, tasks)}
    assert owners == {"t-cat": alice.account_id, "t-dog": bob.account_id}
    resolved = {row.id: (row.state, row.task_id) for row in rows(app, submissions)}
    assert resolved == {alice.id: ("accepted", "t-cat"), bob.id: ("accepted", "t-dog")}


def test_a_window_holding_only_another_accounts_prompt_created_nothing(
    app: Flask, upstream: responses.RequestsMock
) -> None:
    sent = utcnow()
    alice = sent_ahead(app, "alice", sent, "a cat")
    bob = sent_ahead(app, "bob", sent, "a dog")
    upstream.get(UPSTREAM_LIST, json=listing(("t-dog", sent + timedelta(seconds=1))))
    upstream.get(f"{UPSTREAM_LIST}/t-dog", json=task_answer("t-dog", "SUCCEEDED", "a dog"))

    report = reconciler(app, MUCH_LATER).run_pass()

    assert (report.adopted, report.not_created) == (1, 1)
    resolved = {row.id: (row.state, row.task_id) for row in rows(app, submissions)}
    assert resolved == {alice.id: ("not_created", None), bob.id: ("accepted", "t-dog")}
    [task] = rows(app, tasks)
    assert task.account_id == bob.account_id


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


# --------------------------------------------------------------------------- nothing stops a pass


def journaled(app: Flask, task_id: str = "t-ok", **fields: Any) -> dict[str, Any]:
    """Return a journal line as a submit writes it, for a submission the database lost."""
    gateway = app.extensions["gateway"]
    caller = find_caller(gateway.engine, hash_secret(new_key(app, "journaled")))
    assert caller is not None
    line = {
        "submission_id": 4242,
        "task_id": task_id,
        "status": "PENDING",
        "upstream_body": json.dumps(accepted(task_id)),
        "accepted_at": utcnow().isoformat(),
        "account_id": caller.account_id,
        "key_id": caller.key_id,
        "channel": "primary",
        "model": MODEL,
        "service_path": "services/aigc/video-generation/video-synthesis",
        "body_sha256": "0" * 64,
    }
    line.update(fields)
    return {name: value for name, value in line.items() if value is not MISSING}


MISSING = object()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param({"account_id": MISSING}, id="no-account"),
        pytest.param({"model": MISSING}, id="no-model"),
        pytest.param({"key_id": "the primary key"}, id="key-not-a-number"),
        pytest.param({"channel": ["primary"]}, id="channel-not-a-string"),
        # Restored from a backup older than the key: the line names rows that do not exist.
        pytest.param({"account_id": 99999, "key_id": 99999}, id="no-such-key"),
    ],
)
def test_a_journal_line_that_cannot_be_applied_is_set_aside_and_the_rest_replayed(
    app: Flask, caplog: pytest.LogCaptureFixture, broken: dict[str, Any]
) -> None:
    journal = app.extensions["gateway"].journal
    bad = journaled(app, "t-bad", upstream_body="the video of a secret", **broken)
    journal.append(bad)
    journal.append(journaled(app, "t-ok"))
    caplog.set_level(logging.INFO)
    meter = Meter(app.test_client())

    report = reconciler(app, timedelta(0)).run_pass()

    assert report.replayed == 1
    assert [task.task_id for task in rows(app, tasks)] == ["t-ok"]
    assert journal.lines() == 0
    rejected = Path(journal.rejected_path).read_text().splitlines()
    assert [json.loads(line) for line in rejected] == [bad]
    [line] = [r for r in caplog.records if r.getMessage() == "journal line rejected"]
    assert "secret" not in repr(vars(line))
    assert meter.read().delta("bailian_gateway_reconciler_errors_total", step="journal") == 1
    assert report.errors == ["journal"]
    # Set aside once: the next pass has nothing left to replay or to reject.
    again = reconciler(app, timedelta(0)).run_pass()
    assert (again.replayed, again.errors) == (0, [])
    assert len(Path(journal.rejected_path).read_text().splitlines()) == 1


def test_a_replay_the_database_stops_starts_again_where_it_stopped(sqlite_app: Any) -> None:
    app, folder = sqlite_app()
    journal = app.extensions["gateway"].journal
    journal.append(journaled(app, "t-bad", account_id=MISSING))
    journal.append(journaled(app, "t-ok"))
    away = move_database_away(app, folder)

    stopped = reconciler(app, timedelta(0)).run_pass()

    assert stopped.replayed == 0
    assert journal.lines() == 1  # the line set aside is not set aside again
    shutil.move(away, folder)
    assert reconciler(app, timedelta(0)).run_pass().replayed == 1
    assert journal.lines() == 0
    assert len(Path(journal.rejected_path).read_text().splitlines()) == 1
    assert [task.task_id for task in rows(app, tasks)] == ["t-ok"]


def test_a_step_failing_unexpectedly_is_counted_and_the_next_steps_still_run(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    # A budget so small that the second call to a channel in a pass waits: that wait fails.
    app = make_app(BASE_CONFIG.replace("[tasks]", "[tasks]\nreconcile_queries_per_second = 0.01"))
    upstream.post(
        "https://dashscope-intl.test/api/v1/services/aigc/video-generation/video-synthesis",
        json=accepted("t-intl"),
    )
    body = json.dumps({"model": "wan2.2-t2v-plus", "input": {"prompt": "p"}}).encode()
    assert post_submit(app, new_key(app), body).status_code == 200
    stuck = sent_ahead(app, "alice", utcnow())
    upstream.get(UPSTREAM_LIST, json=listing(("t-stuck", utcnow())))
    upstream.get(f"{INTL}/api/v1/tasks/t-intl", json=task_answer("t-intl", "SUCCEEDED"))
    failed: list[float] = []

    def sleep(seconds: float) -> None:
        if not failed:
            failed.append(seconds)
            raise RuntimeError("the wait failed")

    meter = Meter(app.test_client())
    gateway = app.extensions["gateway"]

    report = Reconciler(gateway, clock=lambda: utcnow() + LATER, sleep=sleep).run_pass()

    assert failed
    assert report.errors == ["adoption"]
    assert report.refreshed == 1  # the intl channel's task, after adoption failed
    assert meter.read().delta("bailian_gateway_reconciler_errors_total", step="adoption") == 1
    assert meter.delta("bailian_gateway_reconciler_passes_total", outcome="error") == 1
    [row] = [row for row in rows(app, submissions) if row.id == stuck.id]
    assert row.state == "in_flight"
    assert acquire_lease(gateway.engine, "reconciler", "another-instance", utcnow() + LATER, 60)


@pytest.mark.parametrize("window_hours", [None, 36], ids=["default-window", "36-hour-window"])
def test_submissions_in_flight_over_more_than_a_day_are_listed_a_day_at_a_time(
    make_app: Any, upstream: responses.RequestsMock, window_hours: int | None
) -> None:
    config = BASE_CONFIG
    if window_hours is not None:
        config = config.replace(
            "[tasks]", f"[tasks]\nadoption_window_seconds = {window_hours * 3600}"
        )
    app = make_app(config)
    now = utcnow()
    sent_ahead(app, "alice", now - timedelta(hours=30))
    sent_ahead(app, "alice", now)
    dashscope = FakeListing([("t-recent", now + timedelta(seconds=2))])
    upstream.add_callback(responses.GET, UPSTREAM_LIST, callback=dashscope.answer)
    upstream.get(f"{UPSTREAM_LIST}/t-recent", json=task_answer("t-recent"))

    report = reconciler(app, LATER).run_pass()

    assert report.errors == []
    assert report.adopted == 1
    assert all(end - start <= timedelta(hours=24) for start, end in dashscope.windows)
    # Owned (by the older submission, with a window that long: archived, then, as it is dated).
    owned = [row.task_id for table in (tasks, task_archive) for row in rows(app, table)]
    assert owned == ["t-recent"]


def listing_of_more_than_it_sent() -> dict[str, Any]:
    """Return a listing whose total counts a task that none of its pages holds."""
    body = listing()
    body["total"] = 1
    return body


def listing_of_a_task_created_in_no_year() -> dict[str, Any]:
    """Return a listing whose one item has a creation time no calendar holds."""
    body = listing(("t-odd", utcnow()))
    body["data"][0]["gmt_create"] = 10**20
    return body


@pytest.mark.parametrize(
    "answer",
    [listing_of_more_than_it_sent, listing_of_a_task_created_in_no_year],
    ids=["total-not-reached", "creation-time-out-of-range"],
)
def test_a_listing_that_does_not_prove_the_window_empty_says_nothing_was_created(
    app: Flask,
    api_key: str,
    upstream: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    answer: Any,
) -> None:
    leave_in_flight(app, api_key, upstream)
    upstream.get(UPSTREAM_LIST, json=answer())
    caplog.set_level(logging.INFO)

    report = reconciler(app, MUCH_LATER).run_pass()

    assert (report.not_created, report.errors) == (0, [])
    assert rows(app, submissions)[0].state == "in_flight"
    [line] = [r for r in caplog.records if r.getMessage().startswith("task listing incomplete")]
    assert line.channel == "primary"


def test_one_group_failing_leaves_the_other_groups_adopted(
    app: Flask, upstream: responses.RequestsMock
) -> None:
    sent = utcnow()
    lost = sent_ahead(app, "alice", sent, channel="intl", model="wan2.2-t2v-plus")
    found = sent_ahead(app, "bob", sent + timedelta(seconds=1))
    refusal = {"request_id": "r", "code": "InternalError", "message": "m"}
    upstream.get(f"{INTL}/api/v1/tasks", status=500, json=refusal)
    upstream.get(UPSTREAM_LIST, json=listing(("t-bob", sent + timedelta(seconds=2))))
    upstream.get(f"{UPSTREAM_LIST}/t-bob", json=task_answer("t-bob"))
    meter = Meter(app.test_client())

    report = reconciler(app, LATER).run_pass()

    assert (report.adopted, report.errors) == (1, ["adoption"])
    assert meter.read().delta("bailian_gateway_reconciler_errors_total", step="adoption") == 1
    states = {row.id: (row.state, row.task_id) for row in rows(app, submissions)}
    assert states == {lost.id: ("in_flight", None), found.id: ("accepted", "t-bob")}


# --------------------------------------------------------------------------- lease and budget


def running_tasks(app: Flask, upstream: responses.RequestsMock, count: int) -> list[str]:
    """Submit `count` tasks through the gateway; DashScope accepts each."""
    created: list[str] = []

    def dashscope(_request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        created.append(f"t-{len(created)}")
        return 200, {}, json.dumps(accepted(created[-1]))

    upstream.add_callback(responses.POST, UPSTREAM_SUBMIT, callback=dashscope)
    key = new_key(app)
    for _ in range(count):
        assert post_submit(app, key).status_code == 200
    return created


class SteppingClock:
    """A clock that moves on only when told: the time a slow upstream takes, without waiting."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        """Return the clock's time."""
        return self.now


# A lease of 2 x 1 s + 60 s: shorter than three answers 40 s apart.
SHORT_LEASE = BASE_CONFIG.replace("[tasks]", "[tasks]\nreconcile_interval = 1")


def test_the_lease_is_renewed_while_a_long_pass_runs(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    app = make_app(SHORT_LEASE)
    running_tasks(app, upstream, 3)
    clock = SteppingClock(utcnow() + LATER)
    seen: list[tuple[str, bool]] = []

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        [lease] = rows(app, leases)
        seen.append((lease.holder, lease.expires_at > clock.now))
        clock.now += timedelta(seconds=40)
        return 200, {}, json.dumps(task_answer(str(request.url).rsplit("/", 1)[1]))

    upstream.add_callback(responses.GET, TASK_QUERY, callback=slow)
    reconciler = Reconciler(app.extensions["gateway"], clock=clock, sleep=lambda _s: None)

    report = reconciler.run_pass()

    assert (report.refreshed, report.errors) == (3, [])
    assert seen == [(reconciler.holder, True)] * 3


def test_a_pass_that_lost_its_lease_stops(make_app: Any, upstream: responses.RequestsMock) -> None:
    app = make_app(SHORT_LEASE)
    running_tasks(app, upstream, 3)
    clock = SteppingClock(utcnow() + LATER)
    engine = app.extensions["gateway"].engine
    asked: list[str] = []

    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        asked.append(str(request.url))
        # Another instance saw the lease expire meanwhile and took it.
        assert acquire_lease(engine, "reconciler", "another-instance", clock.now + MUCH_LATER, 600)
        clock.now += timedelta(seconds=40)
        return 200, {}, json.dumps(task_answer(str(request.url).rsplit("/", 1)[1]))

    upstream.add_callback(responses.GET, TASK_QUERY, callback=slow)
    meter = Meter(app.test_client())

    report = Reconciler(app.extensions["gateway"], clock=clock, sleep=lambda _s: None).run_pass()

    assert len(asked) == 1
    assert "lease" in report.errors
    assert meter.read().delta("bailian_gateway_reconciler_errors_total", step="lease") == 1
    [lease] = rows(app, leases)
    assert lease.holder == "another-instance"


def test_the_reconciler_keeps_to_its_query_budget_per_channel(
    make_app: Any, upstream: responses.RequestsMock
) -> None:
    # 2 queries a second, passes 2 s apart: 4 queries a pass for the channel, 0.5 s apart.
    config = BASE_CONFIG.replace(
        "[tasks]", "[tasks]\nreconcile_interval = 2\nreconcile_queries_per_second = 2"
    ).replace("refresh_interval = 0", "refresh_interval = 5")
    app = make_app(config)
    running_tasks(app, upstream, 6)
    elapsed = [0.0]
    asked_at: list[float] = []

    def query(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        asked_at.append(elapsed[0])
        return 200, {}, json.dumps(task_answer(str(request.url).rsplit("/", 1)[1]))

    def sleep(seconds: float) -> None:
        elapsed[0] += seconds

    upstream.add_callback(responses.GET, TASK_QUERY, callback=query)
    reconciler = Reconciler(
        app.extensions["gateway"],
        clock=lambda: utcnow() + LATER,
        sleep=sleep,
        monotonic=lambda: elapsed[0],
    )

    first = reconciler.run_pass()
    second = reconciler.run_pass()  # the two tasks the first pass had no budget for

    assert (first.refreshed, second.refreshed) == (4, 2)
    assert len(asked_at) == 6
    gaps = [later - earlier for earlier, later in pairwise(asked_at)]
    assert min(gaps) >= 0.5
