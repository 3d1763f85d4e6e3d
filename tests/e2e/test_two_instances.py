"""Two gateway instances over one database: shared ownership and one shared refresh budget.

Run with `-s` to see the polling-storm figures (client polls/s against upstream queries/s).
"""

from __future__ import annotations

import json
import math
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

from tests.e2e.conftest import (
    HTTP_TIMEOUT,
    T2V,
    Gateway,
    Simulator,
    bearer,
    query,
    start_gateway,
    start_simulator,
    stop,
    submit,
)

REFRESH_INTERVAL = 1.0
STORM_CLIENTS = 200
STORM_TASKS = 20
STORM_SECONDS = 6.0


@pytest.fixture(scope="module")
def frozen_simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """Serve a DashScope whose tasks stay RUNNING for the whole module."""
    sim = start_simulator(
        tmp_path_factory.mktemp("frozen-sim"), pending_seconds=0.0, running_seconds=3600
    )
    try:
        yield sim
    finally:
        stop(sim.process)


@pytest.fixture(scope="module")
def twins(
    database_url: str, frozen_simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """Start two gateway instances on different ports over the same database."""
    config = textwrap.dedent(
        f"""
        [tasks]
        refresh_interval = {REFRESH_INTERVAL}
        reconcile_interval = 0

        [[channels]]
        name = "sim"
        base_url = "{frozen_simulator.url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{T2V}"]

        [models."{T2V}".price_per_second]
        "480P" = 0.3
        """
    )
    workdir = tmp_path_factory.mktemp("twins")
    threads = {"GATEWAY_THREADS": "32"}
    first = start_gateway(workdir / "a", database_url, config, threads)
    try:
        second = start_gateway(workdir / "b", database_url, config, threads)
    except BaseException:
        stop(first.process)
        raise
    try:
        yield first, second
    finally:
        stop(first.process)
        stop(second.process)


def test_a_task_submitted_through_one_instance_is_queried_through_the_other(
    twins: tuple[Gateway, Gateway],
) -> None:
    first, second = twins
    key = first.create_key("twins-owner")
    stranger = second.create_key("twins-stranger")

    task_id = submit(first, key).json()["output"]["task_id"]
    seen = query(second, key, task_id)
    hidden = query(second, stranger, task_id)

    assert seen.status_code == 200
    assert seen.json()["output"]["task_id"] == task_id
    assert seen.json()["output"]["task_status"] in {"PENDING", "RUNNING"}
    assert (hidden.status_code, hidden.json()["code"]) == (400, "task_not_exist")


def test_a_polling_storm_over_both_instances_is_one_upstream_query_per_task_per_interval(
    twins: tuple[Gateway, Gateway], frozen_simulator: Simulator
) -> None:
    key = twins[0].create_key("twins-storm")
    task_ids = [submit(twins[i % 2], key).json()["output"]["task_id"] for i in range(STORM_TASKS)]
    before = frozen_simulator.stats()["queries_by_task"]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + STORM_SECONDS

    def poll(client_no: int) -> None:
        session = requests.Session()
        done = Counter[int]()
        turn = client_no
        while time.monotonic() < deadline:
            gateway = twins[turn % 2]
            task_id = task_ids[turn % STORM_TASKS]
            url = f"{gateway.api}/tasks/{task_id}"
            done[session.get(url, headers=bearer(key), timeout=HTTP_TIMEOUT).status_code] += 1
            turn += 1
        with lock:
            statuses.update(done)

    started = time.monotonic()
    clients = [threading.Thread(target=poll, args=(n,)) for n in range(STORM_CLIENTS)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=STORM_SECONDS + 60)
    elapsed = time.monotonic() - started
    after = frozen_simulator.stats()["queries_by_task"]
    upstream = {t: after.get(t, 0) - before.get(t, 0) for t in task_ids}

    polls = sum(statuses.values())
    figures = {
        "backend": twins[0].backend,
        "clients": STORM_CLIENTS,
        "tasks": STORM_TASKS,
        "seconds": round(elapsed, 2),
        "client_polls_per_s": round(polls / elapsed, 1),
        "upstream_queries_per_s": round(sum(upstream.values()) / elapsed, 2),
        "max_upstream_queries_per_task": max(upstream.values()),
        "bound_per_task": math.floor(elapsed / REFRESH_INTERVAL) + 1,
    }
    print("\npoll storm:", json.dumps(figures))
    assert set(statuses) == {200}, statuses
    assert polls > STORM_CLIENTS
    assert max(upstream.values()) <= figures["bound_per_task"]
    assert min(upstream.values()) >= 1  # the store is refreshed, not frozen
