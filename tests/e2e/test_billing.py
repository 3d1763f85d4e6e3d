"""Money end to end: gunicorn and the simulator as processes, on SQLite and PostgreSQL.

A limit holds under concurrent submits on many workers; each task is charged once whoever
polls it; failures are charged nothing; the reconciler settles what nobody polls; the usage
report adds up to what DashScope reported, to the cent; a monthly limit starts afresh when
the (test) clock rolls into the next month; and a task released while UNKNOWN is charged once
when it succeeds after all.
"""

from __future__ import annotations

import csv
import io
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import (
    HTTP_TIMEOUT,
    SUBMIT_PATH,
    T2V,
    Gateway,
    Simulator,
    bearer,
    query,
    start_gateway,
    start_simulator,
    stop,
)
from tests.e2e.test_nothing_lost import Ledger, assert_nothing_lost

PRICE_480P = Decimal("0.34")
PRICE_720P = Decimal("0.6")
ESTIMATE = PRICE_480P * 5  # a body naming neither resolution nor duration: 1.70
# Where the gateways of the month test start their clocks (GATEWAY_CLOCK_START).
JANUARY = "2027-01-31T23:50:00Z"
FEBRUARY = "2027-02-01T00:10:00Z"


def utc_month() -> str:
    """Return the real month (UTC) a gateway without a test clock charges in."""
    return datetime.now(UTC).strftime("%Y-%m")


@pytest.fixture
def fresh_simulator(tmp_path: Path) -> Iterator[Simulator]:
    """Serve a DashScope of the test's own, so its counters hold this test's submits only."""
    sim = start_simulator(tmp_path)
    try:
        yield sim
    finally:
        stop(sim.process)
        if sim.process.stdout is not None:
            sim.process.stdout.close()


def config_text(simulator: Simulator) -> str:
    """Return a gateway configuration that prices T2V at 0.34 (480P) and "0.6" (720P)."""
    return textwrap.dedent(
        f"""
        [upstream]
        connect_timeout = 2
        read_timeout = 5
        query_retries = 0

        [tasks]
        refresh_interval = 0
        reconcile_interval = 0

        [[channels]]
        name = "sim"
        base_url = "{simulator.url}"
        api_key_env = "E2E_SIM_KEY"
        models = ["{T2V}"]

        [models."{T2V}".price_per_second]
        "480P" = 0.34
        "720P" = "0.6"
        """
    )


@pytest.fixture
def serve(
    database_url: str, fresh_simulator: Simulator, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    """Start gateways over one database (an SQLite file of the test's, or PostgreSQL)."""
    started: list[Gateway] = []

    def start(**extra: str) -> Gateway:
        url = database_url
        if url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / 'billing.sqlite3'}"
        gateway = start_gateway(
            tmp_path / f"gw{len(started)}", url, config_text(fresh_simulator), extra
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop(gateway.process)


def post(gateway: Gateway, key: str, prompt: str, **parameters: Any) -> requests.Response:
    """Submit a prompt with these parameters."""
    body = {"model": T2V, "input": {"prompt": prompt}, "parameters": parameters}
    return requests.post(
        f"{gateway.url}{SUBMIT_PATH}", json=body, headers=bearer(key), timeout=HTTP_TIMEOUT
    )


def wait_final(gateway: Gateway, key: str, task_id: str) -> dict[str, Any]:
    """Poll a task until it is finished; return the final answer."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer: dict[str, Any] = query(gateway, key, task_id).json()
        if answer["output"]["task_status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
            return answer
        time.sleep(0.2)
    pytest.fail(f"task {task_id} never finished")


def usage_rows(gateway: Gateway, *args: str) -> list[dict[str, str]]:
    """Return `bailian-gateway usage --format csv ARGS` as dicts."""
    text = gateway.cli("usage", "--format", "csv", *args)
    return list(csv.DictReader(io.StringIO(text)))


def shown(gateway: Gateway, account: str) -> dict[str, str]:
    """Return `accounts show ACCOUNT` as a dict of its lines."""
    lines = gateway.cli("accounts", "show", account).splitlines()
    return {
        name.strip(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }


def test_a_limit_of_n_estimates_admits_exactly_n_of_many_concurrent_submits(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    gateway = serve(GATEWAY_WORKERS="4", GATEWAY_THREADS="16")
    key = gateway.create_key("limit-n")
    n = 7
    gateway.cli("accounts", "limit", "limit-n", str(ESTIMATE * n), "--per", "month")

    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(lambda i: post(gateway, key, f"limit {i}"), range(48)))

    accepted = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert len(accepted) == n
    assert {answer.status_code for answer in refused} == {400}
    assert {answer.json()["code"] for answer in refused} == {"Arrearage"}
    assert "estimated at 1.70 CNY" in refused[0].json()["message"]
    assert all(answer.headers["X-Gateway-Estimate"] == "1.70" for answer in answers if answer.ok)
    remaining = sorted(Decimal(answer.headers["X-Gateway-Remaining"]) for answer in accepted)
    assert remaining == [ESTIMATE * i for i in range(n)]
    assert fresh_simulator.stats()["submits"] == n
    account = shown(gateway, "limit-n")
    assert (account["reserved"], account["remaining"], account["in flight"]) == (
        "11.90 CNY",
        "0.00 CNY",
        str(n),
    )
    # Finished and settled, so no later test's reconciler finds them running in a shared schema.
    for answer in accepted:
        wait_final(gateway, key, answer.json()["output"]["task_id"])
    assert shown(gateway, "limit-n")["spent"] == "11.90 CNY"


def test_a_task_polled_by_two_instances_at_once_is_charged_once(
    serve: Callable[..., Gateway],
) -> None:
    first, second = serve(GATEWAY_WORKERS="2"), serve(GATEWAY_WORKERS="2")
    key = first.create_key("twice-polled")
    answer = post(first, key, "[duration=4.5] polled twice", resolution="480P")
    task_id = answer.json()["output"]["task_id"]
    time.sleep(1.5)  # finished upstream by now: every poll below may see SUCCEEDED first

    with ThreadPoolExecutor(16) as pool:
        polls = list(
            pool.map(lambda i: query((first, second)[i % 2], key, task_id).json(), range(16))
        )

    assert {poll["output"]["task_status"] for poll in polls} == {"SUCCEEDED"}
    assert {poll["usage"]["duration"] for poll in polls} == {4.5}
    [charge] = usage_rows(first, "--account", "twice-polled", "--by", "model")
    assert (charge["kind"], charge["tasks"], charge["seconds"]) == ("charge", "1", "4.500")
    assert Decimal(charge["amount"]) == Decimal("1.53")  # 4.5 s x 0.34, not 5 s
    account = shown(second, "twice-polled")
    assert (account["spent"], account["reserved"], account["in flight"]) == (
        "1.53 CNY",
        "0.00 CNY",
        "0",
    )


def test_failed_and_canceled_tasks_are_charged_nothing(serve: Callable[..., Gateway]) -> None:
    gateway = serve()
    key = gateway.create_key("no-charge")
    failed = post(gateway, key, "[fail] this one fails").json()["output"]["task_id"]
    canceled = post(gateway, key, "cancel this one").json()["output"]["task_id"]
    cancel = requests.post(
        f"{gateway.api}/tasks/{canceled}/cancel", headers=bearer(key), timeout=HTTP_TIMEOUT
    )
    assert cancel.status_code == 200

    assert wait_final(gateway, key, failed)["output"]["task_status"] == "FAILED"
    assert wait_final(gateway, key, canceled)["output"]["task_status"] == "CANCELED"

    assert usage_rows(gateway, "--account", "no-charge") == []
    account = shown(gateway, "no-charge")
    assert (account["spent"], account["reserved"], account["in flight"]) == (
        "0.00 CNY",
        "0.00 CNY",
        "0",
    )


def test_the_reconciler_settles_tasks_nobody_polls_and_usage_adds_up_to_the_cent(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    gateway = serve()
    key = gateway.create_key("unpolled-money")
    submits = [
        ("[duration=4.5] a", {"resolution": "480P"}),
        ("[duration=2.25] b", {"size": "1280*720"}),
        ("c", {"duration": 3}),
        ("d", {}),
        ("[duration=7.333] e", {"resolution": "720P", "duration": 8}),
    ]
    task_ids = [
        post(gateway, key, prompt, **parameters).json()["output"]["task_id"]
        for prompt, parameters in submits
    ]
    time.sleep(1.5)  # all finished upstream; nobody asked

    printed = gateway.cli("reconcile")

    # (On PostgreSQL the session's schema holds earlier tests' tasks too: only these count.)
    settled = [line for line in printed.splitlines() if line.startswith("task settled")]
    assert sorted(
        line.split()[2] for line in settled if any(t in line for t in task_ids)
    ) == sorted(f"task_id={task_id}" for task_id in task_ids), printed
    # What DashScope reported for each, asked directly with the channel's key.
    expected = Decimal(0)
    for task_id in task_ids:
        usage = requests.get(
            f"{fresh_simulator.url}/api/v1/tasks/{task_id}",
            headers=bearer(gateway.env["E2E_SIM_KEY"]),
            timeout=HTTP_TIMEOUT,
        ).json()["usage"]
        price = {480: PRICE_480P, 720: PRICE_720P}[usage["SR"]]
        expected += price * Decimal(str(usage["duration"]))
    rows = usage_rows(gateway, "--account", "unpolled-money", "--by", "account", "--by", "day")
    [row] = rows
    assert Decimal(row["amount"]).quantize(Decimal("0.01")) == expected.quantize(Decimal("0.01"))
    assert Decimal(row["amount"]) == expected.quantize(Decimal("0.000001"))
    assert row["tasks"] == "5"
    assert shown(gateway, "unpolled-money")["reserved"] == "0.00 CNY"
    again = gateway.cli("reconcile")  # each once
    assert not any(task_id in again for task_id in task_ids), again


# --------------------------------------------------------------------------- the clock, UNKNOWN


def with_clock(gateway: Gateway, start: str) -> Gateway:
    """Give the gateway's CLI the clock its server was started with."""
    gateway.env["GATEWAY_CLOCK_START"] = start
    return gateway


def ledger_charges(gateway: Gateway) -> dict[str, list[str]]:
    """Return task id -> the periods of its charge rows, as the gateway's database holds them."""
    charges: dict[str, list[str]] = {}
    for task_id, period in gateway.query(
        "SELECT task_id, period FROM ledger WHERE kind = 'charge'"
    ):
        charges.setdefault(task_id, []).append(period)
    return charges


def assert_each_charged_once(
    gateway: Gateway, simulator: Simulator, prompts: Ledger, periods: dict[str, str]
) -> None:
    """Prove the invariant, and that each task created was charged once, in its period."""
    assert assert_nothing_lost(gateway, simulator, prompts) == len(periods)
    charges = ledger_charges(gateway)
    assert {task_id: charges.get(task_id) for task_id in periods} == {
        task_id: [period] for task_id, period in periods.items()
    }


def test_a_monthly_limit_starts_afresh_when_the_clock_rolls_into_february(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    n, account, prompts = 3, "monthly-e2e", Ledger()
    january = with_clock(serve(GATEWAY_CLOCK_START=JANUARY), JANUARY)
    key = january.create_key(account)
    january.cli("accounts", "limit", account, str(ESTIMATE * n), "--per", "month")

    sent = [post(january, key, prompts.prompt(account)) for _ in range(n + 2)]
    assert [answer.status_code for answer in sent] == [200] * n + [400] * 2
    assert {answer.json()["code"] for answer in sent[n:]} == {"Arrearage"}
    assert shown(january, account)["period"] == "2027-01"
    assert shown(january, account)["remaining"] == "0.00 CNY"
    stop(january.process)  # its tasks finish upstream meanwhile, unpolled

    february = with_clock(serve(GATEWAY_CLOCK_START=FEBRUARY), FEBRUARY)
    again = [post(february, key, prompts.prompt(account)) for _ in range(n + 1)]
    assert [answer.status_code for answer in again] == [200] * n + [400]
    assert [answer.headers["X-Gateway-Remaining"] for answer in again[:n]] == [
        str(ESTIMATE * i) for i in reversed(range(n))
    ]
    accepted = [answer.json()["output"]["task_id"] for answer in sent[:n] + again[:n]]
    for task_id in accepted:  # January's too: reserved in January, settled in February
        assert wait_final(february, key, task_id)["output"]["task_status"] == "SUCCEEDED"

    account_now = shown(february, account)
    assert (account_now["period"], account_now["spent"], account_now["reserved"]) == (
        "2027-02",
        "5.10 CNY",  # February's three: January's charges count in January
        "0.00 CNY",
    )
    # Written on 1 February, every one of them: that is the day usage shows.
    [row] = usage_rows(february, "--account", account, "--by", "day")
    assert (row["day"], row["tasks"], Decimal(row["amount"])) == ("2027-02-01", "6", ESTIMATE * 6)
    periods = {task_id: "2027-01" for task_id in accepted[:n]}
    periods |= {task_id: "2027-02" for task_id in accepted[n:]}
    assert_each_charged_once(february, fresh_simulator, prompts, periods)


def test_a_task_released_while_unknown_is_charged_once_when_it_succeeds(
    serve: Callable[..., Gateway], fresh_simulator: Simulator
) -> None:
    gateway, account, prompts = serve(), "unknown-e2e", Ledger()
    key = gateway.create_key(account)
    prompt = prompts.prompt(account, "[unknown=3] [duration=4.5]")
    task_id = post(gateway, key, prompt, resolution="480P").json()["output"]["task_id"]

    deadline = time.monotonic() + 20
    while query(gateway, key, task_id).json()["output"]["task_status"] != "UNKNOWN":
        assert time.monotonic() < deadline, "the task never answered UNKNOWN"
        time.sleep(0.1)
    released = shown(gateway, account)
    final = wait_final(gateway, key, task_id)

    assert (released["reserved"], released["spent"], released["in flight"]) == (
        "0.00 CNY",
        "0.00 CNY",
        "0",
    )
    assert final["output"]["task_status"] == "SUCCEEDED"
    [charge] = usage_rows(gateway, "--account", account)
    assert (charge["kind"], charge["tasks"], Decimal(charge["amount"])) == (
        "charge",
        "1",
        Decimal("1.53"),  # 4.5 s x 0.34
    )
    settled = shown(gateway, account)
    assert (settled["spent"], settled["reserved"]) == ("1.53 CNY", "0.00 CNY")
    assert_each_charged_once(gateway, fresh_simulator, prompts, {task_id: utc_month()})
