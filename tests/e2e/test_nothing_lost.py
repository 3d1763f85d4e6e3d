"""Nothing paid for is lost: faults of the database, the workers and DashScope, as faults.

Every test ends by proving the invariant against the simulator's own record of what it
created: every task DashScope created is owned by the account that submitted it, and no
submit was sent twice.
"""

from __future__ import annotations

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
from sqlalchemy import create_engine, make_url, text

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
    engine = create_engine(make_url(gateway.env["GATEWAY_DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT t.task_id, a.name FROM tasks t JOIN accounts a ON a.id = t.account_id")
            ).all()
    finally:
        engine.dispose()
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


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_exclusive_lock_longer_than_the_busy_timeout_loses_no_task(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    gateway = serve()
    ledger = Ledger()
    key = gateway.create_key("lock-a")
    database = make_url(gateway.env["GATEWAY_DATABASE_URL"]).database
    assert database is not None

    with ThreadPoolExecutor(4) as pool:
        # Written ahead now, answered in 1 s: the records meet the lock.
        answers = [pool.submit(post, gateway, key, ledger.prompt("lock-a", "[answer-after=1]"))]
        answers += [
            pool.submit(post, gateway, key, ledger.prompt("lock-a", "[answer-after=1]"))
            for _ in range(3)
        ]
        time.sleep(0.5)
        holder = sqlite3.connect(database, timeout=1)
        holder.execute("BEGIN EXCLUSIVE")
        time.sleep(12)  # longer than the gateway's 10 s busy timeout
        holder.rollback()
        holder.close()
        statuses = [future.result() for future in answers]

    assert all(answer is not None and answer.status_code == 200 for answer in statuses)
    journaled = [line for line in gateway.log_lines() if line["message"] == "task journaled"]
    assert journaled, "the lock should have sent some records to the journal"
    assert all(line.get("task_id") and line.get("channel") == "sim" for line in journaled)
    journal = Path(gateway.env["GATEWAY_INSTANCE_PATH"]) / "journal.jsonl"
    # The journal replayed twice over: its lines doubled, two reconcilers at once.
    journal.write_text(journal.read_text() * 2)
    with ThreadPoolExecutor(2) as pool:
        printed = list(pool.map(lambda _i: reconcile(gateway), range(2)))

    assert sum(text.count("journal replayed") for text in printed) == 2 * len(journaled)
    assert assert_nothing_lost(gateway, fresh_simulator, ledger) == 4
    health = requests.get(f"{gateway.url}/readyz", timeout=HTTP_TIMEOUT).json()
    assert health["status"] == "ok"
    assert "journal_lines" not in health


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
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
    key = gateway.create_key("lost-answers")
    [worker] = worker_pids(gateway)

    with ThreadPoolExecutor(2) as pool:
        killed = pool.submit(post, gateway, key, ledger.prompt("lost-answers", "[answer-after=3]"))
        time.sleep(1.0)  # the task exists upstream now; its answer is 2 s away
        os.kill(worker, signal.SIGKILL)
        assert killed.result() is None
    gateway.wait_for_log(lambda messages: len(worker_pids(gateway)) == 1, timeout=30)
    # DashScope creates this one after the gateway has given up waiting (read timeout 2 s).
    timed_out = post(gateway, key, ledger.prompt("lost-answers", "[sleep=3]"))
    assert timed_out is not None
    assert timed_out.status_code == 504
    assert timed_out.headers["x-should-retry"] == "false"

    time.sleep(GRACE_SECONDS)
    printed = reconcile(gateway)

    assert printed.count("task adopted") == 2, printed
    assert "channel=sim" in printed
    assert assert_nothing_lost(gateway, fresh_simulator, ledger) == 2
    # The account sees both, as if nothing had happened.
    listed = requests.get(f"{gateway.api}/tasks", headers=bearer(key), timeout=HTTP_TIMEOUT)
    assert listed.json()["total"] == 2


# --------------------------------------------------------------------------- nobody polls


def test_a_task_nobody_polls_reaches_succeeded_within_two_reconcile_intervals(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    interval = 2.0
    gateway = serve(reconcile_interval=interval)
    key = gateway.create_key("unpolled")
    answer = submit(gateway, key, prompt="nobody will poll this")
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
