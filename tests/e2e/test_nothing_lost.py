"""Nothing paid for is lost: faults of the database, the workers and DashScope, as faults.

Every test ends by proving the invariant against the simulator's own record of what it
created: every task DashScope created is owned by the account that submitted it, and no
submit was sent twice.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Connection, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import (
    BIN_DIR,
    HTTP_TIMEOUT,
    REPO_ROOT,
    SIM_KEY,
    T2V,
    Gateway,
    Simulator,
    bearer,
    start_gateway,
    start_simulator,
    stop,
    submit,
)

READ_TIMEOUT = 2
RECORD_RETRY_SECONDS = 1
ADOPTION_WINDOW_SECONDS = 15
# How long after sending the reconciler leaves a submission to the request that sent it:
# connect + read timeouts + the record retries + 5 s.
GRACE_SECONDS = 2 + READ_TIMEOUT + RECORD_RETRY_SECONDS + 5


@pytest.fixture
def fresh_simulator(tmp_path: Path) -> Iterator[Simulator]:
    """Serve a DashScope of the test's own, so its record (and its listing) holds its tasks only.

    One upstream key shared by gateways over different databases would show each of them the
    others' tasks as unowned ones: a deployment must not do that, and a test does not either.
    """
    sim = start_simulator(tmp_path)
    try:
        yield sim
    finally:
        stop(sim.process)
        if sim.process.stdout is not None:
            sim.process.stdout.close()


def config_text(simulator: Simulator, reconcile_interval: float = 0) -> str:
    """Return a gateway configuration with short timeouts, retries and adoption window."""
    return textwrap.dedent(
        f"""
        [upstream]
        connect_timeout = 2
        read_timeout = {READ_TIMEOUT}
        query_retries = 0

        [tasks]
        refresh_interval = 0.5
        record_retry_seconds = {RECORD_RETRY_SECONDS}
        reconcile_interval = {reconcile_interval}
        adoption_window_seconds = {ADOPTION_WINDOW_SECONDS}

        [[channels]]
        name = "sim"
        base_url = "{simulator.url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{T2V}"]

        [models."{T2V}".price_per_second]
        "480P" = 0.3
        """
    )


APPLICATION_NAME = "bailian-gateway-e2e-nothing-lost"


@pytest.fixture
def own_database(database_url: str, tmp_path: Path) -> Iterator[str]:
    """Return a database of the test's own: an SQLite file, or a PostgreSQL schema dropped after.

    The session's schema holds other tests' tasks: a reconciler pass here must not spend its
    budget on them, nor leave its own (running, in flight) to theirs.
    """
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'paid.sqlite3'}"
        return
    base = make_url(database_url)
    schema = f"lost_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    # Named, so that the fault test terminates the gateway's connections and no one else's.
    query = {"options": f"-csearch_path={schema}", "application_name": APPLICATION_NAME}
    try:
        yield base.update_query_dict(query).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def serve(
    own_database: str, fresh_simulator: Simulator, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """Start gateways over the test's own database."""
    started: list[Gateway] = []

    def start(reconcile_interval: float = 0, **extra: str) -> Gateway:
        config = config_text(fresh_simulator, reconcile_interval)
        gateway = start_gateway(tmp_path / f"gw{len(started)}", own_database, config, extra)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop(gateway.process)


class Ledger:
    """Which account sent which prompt: each submit in these tests has a prompt of its own."""

    def __init__(self) -> None:
        self.account_of: dict[str, str] = {}
        self._lock = threading.Lock()
        self._count = 0

    def prompt(self, account: str, marker: str = "") -> str:
        """Return a new prompt, remembering that this account sends it."""
        with self._lock:
            self._count += 1
            prompt = f"{marker} paid work {self._count}".strip()
            self.account_of[prompt] = account
        return prompt


def owners(gateway: Gateway) -> dict[str, str]:
    """Return task id -> owning account name, as the gateway's database records them."""
    rows = gateway.query(
        "SELECT t.task_id, a.name FROM tasks t JOIN accounts a ON a.id = t.account_id"
    )
    return {task_id: name for task_id, name in rows}


def created_by_simulator(simulator: Simulator, ledger: Ledger) -> list[dict[str, Any]]:
    """Return the simulator's tasks that this test's submits created."""
    return [task for task in simulator.stats()["task_list"] if task["prompt"] in ledger.account_of]


def assert_nothing_lost(gateway: Gateway, simulator: Simulator, ledger: Ledger) -> int:
    """Prove the invariant; return how many tasks DashScope created for the test."""
    created = created_by_simulator(simulator, ledger)
    recorded = owners(gateway)
    for task in created:
        assert task["owner_hint"] == SIM_KEY[-6:]
        assert recorded.get(task["task_id"]) == ledger.account_of[task["prompt"]], task
    sent = simulator.stats()["submits_by_prompt"]
    twice = {prompt: n for prompt, n in sent.items() if prompt in ledger.account_of and n != 1}
    assert not twice, f"submits sent more than once: {twice}"
    return len(created)


def reconcile(gateway: Gateway) -> str:
    """Run `bailian-gateway reconcile` once, as cron would; return what it printed."""
    return gateway.cli("reconcile")


def post(gateway: Gateway, key: str, prompt: str) -> requests.Response | None:
    """Submit a prompt; None when the connection broke (a worker killed under it)."""
    try:
        return submit(gateway, key, prompt=prompt)
    except requests.ConnectionError:
        return None


# --------------------------------------------------------------------------- the database


NEEDS_POSTGRESQL = pytest.mark.skipif(
    not os.environ.get("GATEWAY_TEST_DATABASE_URL"), reason="GATEWAY_TEST_DATABASE_URL is not set"
)
# How long a write waits for a lock another connection holds: SQLite's busy timeout, and
# PostgreSQL's lock timeout, the same (app/store/engine.py).
LOCK_WAIT_SECONDS = 10


class Outage:
    """A database the gateway serves on, which the test makes refuse writes for a while."""

    url: str
    # The kind of error the gateway meets, as its journal lines and /readyz name it.
    cause: str
    # The longest a submit may wait for its 503 while the database refuses writes.
    longest_refusal: float

    def begin(self) -> None:
        """Start refusing the gateway's writes."""
        raise NotImplementedError

    def end(self) -> None:
        """Take writes again (nothing if the outage is over already)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of whatever the outage needed."""
        self.end()


class SQLiteLockedOut(Outage):
    """Another process holding BEGIN EXCLUSIVE on the SQLite file longer than the busy timeout.

    In the gateway's journal mode (WAL) that keeps writers out, and readers in.
    """

    cause = "OperationalError"
    # A process's writes to one file queue in one line: a write ahead that arrives during the
    # outage may wait for the batch before it to give up (a busy timeout), then for its own.
    longest_refusal = 2 * LOCK_WAIT_SECONDS + 5

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._holder: sqlite3.Connection | None = None

    def begin(self) -> None:
        self._holder = sqlite3.connect(self.path, timeout=1, isolation_level=None)
        self._holder.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        if self._holder is not None:
            self._holder.execute("ROLLBACK")
            self._holder.close()
            self._holder = None


class PostgreSQLOutage(Outage):
    """An outage of a PostgreSQL database of the test's own, dropped after.

    The other tests share the test server's database: what this one does to its own (ALTER
    DATABASE, LOCK TABLE, terminating sessions) reaches no one else's.
    """

    def __init__(self) -> None:
        base = make_url(os.environ["GATEWAY_TEST_DATABASE_URL"])
        self.name = f"lost_{os.getpid()}_{secrets.token_hex(4)}"
        self.admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = base.set(database=self.name).render_as_string(hide_password=False)

    def close(self) -> None:
        try:
            self.end()
        finally:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.admin.dispose()


class PostgreSQLLockedOut(PostgreSQLOutage):
    """Another session holding `LOCK TABLE submissions` longer than the lock timeout."""

    cause = "OperationalError"  # LockNotAvailable
    longest_refusal = LOCK_WAIT_SECONDS + 5  # each session waits for itself, none in line

    def __init__(self) -> None:
        super().__init__()
        self._holder: Connection | None = None
        self._engine = create_engine(self.url, poolclass=NullPool)

    def begin(self) -> None:
        self._holder = self._engine.connect()
        # ACCESS EXCLUSIVE, as a bare LOCK TABLE takes it: the write-ahead's INSERT and the
        # record's INSERT ... SELECT and UPDATE all wait for it.
        self._holder.execute(text("LOCK TABLE submissions IN ACCESS EXCLUSIVE MODE"))

    def end(self) -> None:
        if self._holder is not None:
            self._holder.rollback()
            self._holder.close()
            self._holder = None
            self._engine.dispose()


class PostgreSQLReadOnly(PostgreSQLOutage):
    """A failover to a standby: the gateway's sessions dropped, and every new one read-only."""

    cause = "InternalError"  # ReadOnlySqlTransaction
    longest_refusal = 5  # refused at once
    _read_only = False

    def begin(self) -> None:
        self._read_only = True
        with self.admin.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{self.name}" SET default_transaction_read_only = on')
            )
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                    " WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": self.name},
            )

    def end(self) -> None:
        # The sessions the gateway opened meanwhile stay open, read-only: it must find its own
        # way back to writing.
        if self._read_only:
            self._read_only = False
            with self.admin.connect() as conn:
                conn.execute(
                    text(f'ALTER DATABASE "{self.name}" RESET default_transaction_read_only')
                )


OUTAGES = [
    pytest.param("sqlite-exclusive-lock", id="sqlite-exclusive-lock"),
    pytest.param("postgresql-table-lock", id="postgresql-table-lock", marks=NEEDS_POSTGRESQL),
    pytest.param("postgresql-read-only", id="postgresql-read-only", marks=NEEDS_POSTGRESQL),
]


@pytest.fixture
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    """Return a database of the test's own and a way to make it refuse writes."""
    kinds: dict[str, Callable[[], Outage]] = {
        "sqlite-exclusive-lock": lambda: SQLiteLockedOut(tmp_path / "paid.sqlite3"),
        "postgresql-table-lock": PostgreSQLLockedOut,
        "postgresql-read-only": PostgreSQLReadOnly,
    }
    made = kinds[request.param]()
    try:
        yield made
    finally:
        made.close()


def wait_until_sent(simulator: Simulator, prompts: list[str], timeout: float = 20) -> None:
    """Wait until DashScope has received each of these prompts' submits."""
    deadline = time.monotonic() + timeout
    while not set(prompts) <= set(simulator.stats()["submits_by_prompt"]):
        assert time.monotonic() < deadline, "the submits never reached the simulator"
        time.sleep(0.05)


def journaled_lines(gateway: Gateway, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Return the log's `task journaled` lines, once it holds `count` of them.

    A worker's log lines are written by a thread of its own, a moment after they were logged.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in gateway.log_lines() if line["message"] == "task journaled"]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.parametrize("outage", OUTAGES, indirect=True)
def test_a_database_that_refuses_writes_sends_no_submit_and_loses_no_accepted_task(
    outage: Outage, fresh_simulator: Simulator, tmp_path: Path
) -> None:
    # One worker: on SQLite its writes queue in one line, and the outage's length is known.
    gateway = start_gateway(
        tmp_path / "gw", outage.url, config_text(fresh_simulator), {"GATEWAY_WORKERS": "1"}
    )
    try:
        ledger = Ledger()
        key = gateway.create_key("outage")
        with ThreadPoolExecutor(8) as pool:
            # Written ahead and sent before the outage, answered 1 s later: their records meet it.
            sent = [ledger.prompt("outage", "[answer-after=1]") for _ in range(3)]
            accepted = [pool.submit(post, gateway, key, prompt) for prompt in sent]
            wait_until_sent(fresh_simulator, sent)
            outage.begin()
            try:
                # Submits that arrive during the outage: none may leave for DashScope.
                during = [ledger.prompt("outage", "during the outage") for _ in range(3)]
                refused = [pool.submit(post, gateway, key, prompt) for prompt in during]
                readiness = pool.submit(requests.get, f"{gateway.url}/readyz", timeout=HTTP_TIMEOUT)
                # The outage lasts until every answer is in: each met it whole.
                refusals = [future.result(timeout=2 * HTTP_TIMEOUT) for future in refused]
                answers = [future.result(timeout=2 * HTTP_TIMEOUT) for future in accepted]
                ready = readiness.result(timeout=2 * HTTP_TIMEOUT)
            finally:
                outage.end()

        for refusal in refusals:
            assert refusal is not None
            assert refusal.status_code == 503, refusal.text
            assert refusal.json()["code"] == "ServiceUnavailable"
            assert "nothing was sent" in refusal.json()["message"]
            assert refusal.elapsed.total_seconds() < outage.longest_refusal
        assert not set(during) & set(fresh_simulator.stats()["submits_by_prompt"])
        assert all(answer is not None and answer.status_code == 200 for answer in answers)
        assert ready.status_code == 503
        assert ready.json()["reason"] == f"database cannot be written: {outage.cause}"
        # Every accepted task of the outage is in the journal (written before its answer).
        accepted_ids = sorted(answer.json()["output"]["task_id"] for answer in answers if answer)
        journal = Path(gateway.env["GATEWAY_INSTANCE_PATH"]) / "journal.jsonl"
        entries = [json.loads(line) for line in journal.read_text().splitlines()]
        assert sorted(entry["task_id"] for entry in entries) == accepted_ids
        journaled = journaled_lines(gateway, len(accepted_ids))
        assert sorted(line["task_id"] for line in journaled) == accepted_ids
        assert all(line["channel"] == "sim" for line in journaled)
        assert {line["cause"] for line in journaled} == {outage.cause}

        # The database takes writes again: so does the gateway, by itself.
        after = post(gateway, key, ledger.prompt("outage", "after the outage"))
        assert after is not None
        assert after.status_code == 200, after.text

        # The journal replayed twice over: its lines doubled, two reconcilers at once.
        journal.write_text(journal.read_text() * 2)
        with ThreadPoolExecutor(2) as pool:
            printed = list(pool.map(lambda _i: reconcile(gateway), range(2)))

        assert sum(text.count("journal replayed") for text in printed) == 2 * len(journaled)
        assert assert_nothing_lost(gateway, fresh_simulator, ledger) == 4
        health = requests.get(f"{gateway.url}/readyz", timeout=HTTP_TIMEOUT).json()
        assert health["status"] == "ok"
        assert "journal_lines" not in health
    finally:
        stop(gateway.process)


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=NEEDS_POSTGRESQL)], indirect=True
)
def test_postgresql_backends_terminated_under_load_lose_no_task(
    serve: Callable[..., Gateway], fresh_simulator: Simulator, database_url: str
) -> None:
    gateway = serve()
    ledger = Ledger()
    keys = {account: gateway.create_key(account) for account in ("pg-a", "pg-b")}
    deadline = time.monotonic() + 8
    answers: list[int] = []
    lock = threading.Lock()

    def client(account: str) -> None:
        session = requests.Session()
        while time.monotonic() < deadline:
            response = post(gateway, keys[account], ledger.prompt(account))
            assert response is not None
            with lock:
                answers.append(response.status_code)
            if response.status_code == 200:
                task_id = response.json()["output"]["task_id"]
                session.get(
                    f"{gateway.api}/tasks/{task_id}", headers=bearer(keys[account]), timeout=30
                )

    admin = create_engine(make_url(database_url))
    terminated = 0

    def killer() -> None:
        nonlocal terminated
        while time.monotonic() < deadline - 1:
            time.sleep(1.0)
            with admin.begin() as conn:
                terminated += len(
                    conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE application_name = :name"
                        ),
                        {"name": APPLICATION_NAME},
                    ).all()
                )

    threads = [threading.Thread(target=client, args=(a,)) for a in keys for _ in range(8)]
    threads.append(threading.Thread(target=killer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    admin.dispose()

    assert terminated > 0
    assert answers
    # A submit either went through or was refused before it was sent; never a 500.
    assert set(answers) <= {200, 503}, sorted(set(answers))
    time.sleep(GRACE_SECONDS)
    reconcile(gateway)
    assert assert_nothing_lost(gateway, fresh_simulator, ledger) == answers.count(200) + sum(
        1 for line in gateway.log_lines() if line["message"] == "task adopted"
    )


# --------------------------------------------------------------------------- lost answers


def worker_pids(gateway: Gateway) -> list[int]:
    """Return the pids of the gunicorn master's workers."""
    master = gateway.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_killed_worker_and_a_read_timeout_lose_no_task(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    gateway = serve(GATEWAY_WORKERS="1")
    ledger = Ledger()
    key, other_key = gateway.create_key("lost-answers"), gateway.create_key("other-account")
    [worker] = worker_pids(gateway)

    # The worker serves two accounts when it dies: their lost tasks are told apart.
    with ThreadPoolExecutor(2) as pool:
        killed = [
            pool.submit(post, gateway, k, ledger.prompt(account, "[answer-after=3]"))
            for k, account in ((key, "lost-answers"), (other_key, "other-account"))
        ]
        time.sleep(1.0)  # the tasks exist upstream now; their answers are 2 s away
        os.kill(worker, signal.SIGKILL)
        assert [future.result() for future in killed] == [None, None]
    gateway.wait_for_log(lambda messages: len(worker_pids(gateway)) == 1, timeout=30)
    # DashScope creates this one after the gateway has given up waiting (read timeout 2 s).
    timed_out = post(gateway, key, ledger.prompt("lost-answers", "[sleep=3]"))
    assert timed_out is not None
    assert timed_out.status_code == 504
    assert timed_out.headers["x-should-retry"] == "false"

    time.sleep(GRACE_SECONDS)
    printed = reconcile(gateway)

    assert printed.count("task adopted") == 3, printed
    assert "channel=sim" in printed
    assert assert_nothing_lost(gateway, fresh_simulator, ledger) == 3
    # The account sees both, as if nothing had happened.
    listed = requests.get(f"{gateway.api}/tasks", headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert listed.json()["total"] == 2


# --------------------------------------------------------------------------- nobody polls


def test_a_task_nobody_polls_reaches_succeeded_within_two_reconcile_intervals(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    interval = 2.0
    gateway = serve(reconcile_interval=interval)
    ledger = Ledger()
    key = gateway.create_key("unpolled")
    answer = submit(gateway, key, prompt=ledger.prompt("unpolled", "nobody will poll this"))
    assert answer.status_code == 200
    # The simulator finishes it after 1 s; from then on, two intervals at most.
    deadline = time.monotonic() + 1.0 + 2 * interval + 1.0
    statuses: list[str] = []
    while time.monotonic() < deadline:
        listed = requests.get(f"{gateway.api}/tasks", headers=bearer(key), timeout=HTTP_TIMEOUT)
        statuses = [item["status"] for item in listed.json()["data"]]
        if statuses == ["SUCCEEDED"]:
            break
        time.sleep(0.2)
    assert statuses == ["SUCCEEDED"]
    task_id = answer.json()["output"]["task_id"]
    # Only the reconciler asked DashScope about it.
    assert fresh_simulator.stats()["queries_by_task"].get(task_id, 0) >= 1
    assert assert_nothing_lost(gateway, fresh_simulator, ledger) == 1


def test_two_instances_reconciling_at_once_adopt_each_task_once(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    first = serve(GATEWAY_WORKERS="1")
    ledger = Ledger()
    key = first.create_key("twins")
    # Sent together: after a timeout the channel sits out a while, so one after the other the
    # second would not be sent at all.
    with ThreadPoolExecutor(2) as pool:
        lost = list(
            pool.map(lambda _i: post(first, key, ledger.prompt("twins", "[sleep=3]")), range(2))
        )
    assert [None if answer is None else answer.status_code for answer in lost] == [504, 504]
    time.sleep(GRACE_SECONDS)

    runs = [
        subprocess.Popen(
            [str(BIN_DIR / "bailian-gateway"), "reconcile"],
            cwd=REPO_ROOT,
            env=first.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    printed = [run.communicate(timeout=60)[0] for run in runs]

    assert all(run.returncode == 0 for run in runs)
    assert sum(text.count("task adopted") for text in printed) == 2, printed
    assert assert_nothing_lost(first, fresh_simulator, ledger) == 2
