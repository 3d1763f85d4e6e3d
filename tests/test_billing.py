"""Money in the app: reserved at submit, refused past the limit, released, settled once."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import select, text

from app.billing import ledger
from app.billing.ledger import Limit, LimitExceeded, Reservation
from app.billing.prices import Estimate
from app.reconcile import Reconciler
from app.store import find_caller, hash_secret, record_answer, utcnow
from app.store.submissions import write_ahead
from app.store.tables import account_balances, submissions
from app.store.tables import ledger as ledger_table
from app.store.time import RunningClock, clock_from, parse_instant
from tests.conftest import INTL, PRIMARY, SUBMIT_PATH, bearer, new_key

UPSTREAM_SUBMIT = f"{PRIMARY}/api/v1/services/aigc/video-generation/video-synthesis"
MODEL = "wan2.5-t2v-preview"  # 480P 0.3, 720P 0.6 per second in BASE_CONFIG


def body(**parameters: Any) -> dict[str, Any]:
    """Return a submit body with these parameters."""
    return {"model": MODEL, "input": {"prompt": "a cat"}, "parameters": parameters}


def accepted(task_id: str) -> dict[str, Any]:
    """Return DashScope's answer to an accepted submit."""
    return {"request_id": "r", "output": {"task_id": task_id, "task_status": "PENDING"}}


def final(task_id: str, status: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return DashScope's answer about a finished task."""
    answer: dict[str, Any] = {
        "request_id": "r",
        "output": {"task_id": task_id, "task_status": status},
    }
    if usage is not None:
        answer["usage"] = usage
    return answer


def ledger_rows(app: Flask) -> list[Any]:
    """Return the ledger, oldest first."""
    with app.extensions["gateway"].engine.connect() as conn:
        return conn.execute(select(ledger_table).order_by(ledger_table.c.id)).all()


def kinds(app: Flask) -> list[tuple[str, Decimal]]:
    """Return (kind, amount) of every ledger row."""
    return [(row.kind, row.amount) for row in ledger_rows(app)]


def assert_balances_are_the_ledger(app: Flask) -> None:
    """Recompute every balance from the ledger rows alone and compare."""
    engine = app.extensions["gateway"].engine
    recomputed = ledger.ledger_sums(engine)
    held = ledger.balances(engine)
    assert set(recomputed) <= set(held)
    for key, value in held.items():
        assert recomputed.get(key, (Decimal(0), Decimal(0))) == value, key


def test_a_submit_past_the_limit_is_arrearage_and_dashscope_is_never_called(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    ledger.set_limit(
        app.extensions["gateway"].engine, "acme", Limit(Decimal("1.2"), "month"), utcnow()
    )

    response = app.test_client().post(SUBMIT_PATH, json=body(duration=5), headers=bearer(api_key))

    assert response.status_code == 400
    assert response.json is not None
    assert response.json["code"] == "Arrearage"
    message = response.json["message"]
    assert "1.20 CNY per month" in message
    assert "1.20 CNY remains" in message
    assert "estimated at 1.50 CNY" in message
    assert len(upstream.calls) == 0
    with app.extensions["gateway"].engine.connect() as conn:
        assert conn.execute(select(submissions)).all() == []
    assert ledger_rows(app) == []


def test_a_submit_carries_its_estimate_and_what_remains(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-1"))
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-2"))
    client = app.test_client()

    unlimited = client.post(
        SUBMIT_PATH, json=body(resolution="720P", duration=3), headers=bearer(api_key)
    )
    ledger.set_limit(
        app.extensions["gateway"].engine, "acme", Limit(Decimal(10), "total"), utcnow()
    )
    limited = client.post(SUBMIT_PATH, json=body(size="832*480"), headers=bearer(api_key))

    assert unlimited.status_code == 200
    assert unlimited.json == accepted("t-1")  # the body is DashScope's, unchanged
    assert unlimited.headers["X-Gateway-Estimate"] == "1.80"
    assert "X-Gateway-Remaining" not in unlimited.headers
    assert limited.headers["X-Gateway-Estimate"] == "1.50"
    assert limited.headers["X-Gateway-Remaining"] == "6.70"  # 10 - 1.80 - 1.50
    assert kinds(app) == [("reserve", Decimal("1.8")), ("reserve", Decimal("1.5"))]
    assert_balances_are_the_ledger(app)


def test_an_unpriced_resolution_is_invalid_parameter_before_anything(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    response = app.test_client().post(
        SUBMIT_PATH, json=body(resolution="1080P"), headers=bearer(api_key)
    )

    assert response.status_code == 400
    assert response.json is not None
    assert response.json["code"] == "InvalidParameter"
    assert response.json["message"].startswith("parameters.resolution: the resolution 1080P")
    assert "priced tiers: 480P, 720P" in response.json["message"]
    assert ledger_rows(app) == []


@pytest.mark.parametrize("duration", [-5, 0, 10**23])
def test_a_duration_that_would_credit_or_overflow_is_refused_before_anything(
    app: Flask, api_key: str, upstream: responses.RequestsMock, duration: int
) -> None:
    response = app.test_client().post(
        SUBMIT_PATH, json=body(duration=duration), headers=bearer(api_key)
    )

    assert response.status_code == 400
    assert response.json is not None
    assert response.json["code"] == "InvalidParameter"
    assert response.json["message"].startswith("parameters.duration: ")
    assert ledger_rows(app) == []
    assert len(upstream.calls) == 0


def test_a_submit_dashscope_refuses_releases_its_reservation(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(
        UPSTREAM_SUBMIT,
        status=400,
        json={"request_id": "r", "code": "DataInspectionFailed", "message": "no"},
    )

    response = app.test_client().post(SUBMIT_PATH, json=body(), headers=bearer(api_key))

    assert response.status_code == 400
    assert kinds(app) == [("reserve", Decimal("1.5")), ("release", Decimal("1.5"))]
    view = ledger.show_account(app.extensions["gateway"].engine, "acme", utcnow())
    assert (view.reserved, view.spent, view.in_flight) == (0, 0, 0)
    assert_balances_are_the_ledger(app)


def submit_and_finish(app: Flask, key: str, upstream: Any, answer: dict[str, Any]) -> Any:
    """Submit a task, then poll it twice while DashScope answers it finished."""
    task_id = answer["output"]["task_id"]
    upstream.post(UPSTREAM_SUBMIT, json=accepted(task_id))
    upstream.get(f"{PRIMARY}/api/v1/tasks/{task_id}", json=answer)
    client = app.test_client()
    assert client.post(SUBMIT_PATH, json=body(duration=5), headers=bearer(key)).status_code == 200
    first = client.get(f"/alibailian/api/v1/tasks/{task_id}", headers=bearer(key))
    second = client.get(f"/alibailian/api/v1/tasks/{task_id}", headers=bearer(key))  # stored
    assert first.status_code == second.status_code == 200
    return first


def test_a_succeeded_task_is_charged_its_reported_seconds_once(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    answer = final("t-ok", "SUCCEEDED", {"duration": 4.5, "SR": 480, "video_count": 1})

    submit_and_finish(app, api_key, upstream, answer)
    # Whoever else sees the final status later settles nothing.
    gateway = app.extensions["gateway"]
    again = ledger.settle_task(
        gateway.engine, "t-ok", "SUCCEEDED", answer["usage"], gateway.settings.pricing, utcnow()
    )

    assert again is None
    assert kinds(app) == [
        ("reserve", Decimal("1.5")),
        ("charge", Decimal("1.35")),  # 4.5 s x 0.3, not 5 s
        ("release", Decimal("1.5")),
    ]
    charge = ledger_rows(app)[1]
    assert (charge.task_id, charge.model, charge.seconds, charge.tier) == (
        "t-ok",
        MODEL,
        Decimal("4.5"),
        "480P",
    )
    view = ledger.show_account(gateway.engine, "acme", utcnow())
    assert (view.spent, view.reserved, view.in_flight) == (Decimal("1.35"), 0, 0)
    assert_balances_are_the_ledger(app)


def test_failed_and_canceled_tasks_are_charged_nothing(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit_and_finish(app, api_key, upstream, final("t-failed", "FAILED"))
    submit_and_finish(app, api_key, upstream, final("t-canceled", "CANCELED"))

    assert [kind for kind, _ in kinds(app)] == ["reserve", "release", "reserve", "release"]
    view = ledger.show_account(app.extensions["gateway"].engine, "acme", utcnow())
    assert (view.spent, view.reserved) == (0, 0)


def test_the_reconciler_settles_a_finished_task_left_unsettled(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-left"))
    assert (
        app.test_client().post(SUBMIT_PATH, json=body(), headers=bearer(api_key)).status_code == 200
    )
    gateway = app.extensions["gateway"]
    # Recorded finished by a process that died before it settled.
    usage = {"duration": 5, "SR": 720}
    record_answer(
        gateway.engine,
        "t-left",
        "SUCCEEDED",
        json.dumps(final("t-left", "SUCCEEDED", usage)),
        utcnow(),
    )

    report = Reconciler(gateway, sleep=lambda _s: None).run_pass()
    later = Reconciler(gateway, sleep=lambda _s: None).run_pass()

    assert (report.settled, later.settled) == (1, 0)
    assert "task settled task_id=t-left charged=3.00" in report.lines
    assert kinds(app)[1:] == [("charge", Decimal("3")), ("release", Decimal("1.5"))]


def reserve_at(app: Flask, caller: Any, amount: str, now: datetime) -> Any:
    """Write a submission ahead with a reservation at a given time."""
    return write_ahead(
        app.extensions["gateway"].engine,
        account_id=caller.account_id,
        key_id=caller.key_id,
        model=MODEL,
        channel="primary",
        service_path="services/aigc/video-generation/video-synthesis",
        body_sha256="0" * 64,
        now=now,
        reservation=Reservation(Estimate("480P", Decimal(5), Decimal(amount))),
    )


def test_a_monthly_limit_starts_afresh_when_the_month_rolls_over(app: Flask) -> None:
    engine = app.extensions["gateway"].engine
    caller = find_caller(engine, hash_secret(new_key(app, "monthly")))
    ledger.set_limit(engine, "monthly", Limit(Decimal(3), "month"), utcnow())
    january = datetime(2025, 1, 31, 23, 59, 59)
    february = datetime(2025, 2, 1, 0, 0, 0)

    _, first = reserve_at(app, caller, "1.5", january)
    _, second = reserve_at(app, caller, "1.5", january)
    with pytest.raises(LimitExceeded) as refused:
        reserve_at(app, caller, "0.01", january)
    assert refused.value.remaining == 0
    _, fresh = reserve_at(app, caller, "1.5", february)

    assert (first.remaining, second.remaining, fresh.remaining) == (
        Decimal("1.5"),
        0,
        Decimal("1.5"),
    )
    with engine.connect() as conn:
        periods = {row.period: row.reserved for row in conn.execute(select(account_balances))}
    assert periods == {"2025-01": Decimal(3), "2025-02": Decimal("1.5"), "total": Decimal("4.5")}
    assert_balances_are_the_ledger(app)


def test_a_total_limit_counts_every_month_and_adjustments_move_it(app: Flask) -> None:
    engine = app.extensions["gateway"].engine
    caller = find_caller(engine, hash_secret(new_key(app, "prepaid")))
    ledger.set_limit(engine, "prepaid", Limit(Decimal(2), "total"), utcnow())

    reserve_at(app, caller, "1.5", datetime(2025, 1, 10))
    with pytest.raises(LimitExceeded):  # a total limit does not start afresh
        reserve_at(app, caller, "1.5", datetime(2025, 2, 10))
    ledger.adjust(engine, "prepaid", Decimal(1), "paid 1 more", utcnow())
    _, after = reserve_at(app, caller, "1.5", datetime(2025, 2, 10))
    ledger.adjust(engine, "prepaid", Decimal("-0.25"), "a correction", utcnow())

    assert after.remaining == 0
    view = ledger.show_account(engine, "prepaid", utcnow())
    assert (view.spent, view.reserved, view.remaining) == (
        Decimal("-0.75"),
        Decimal(3),
        Decimal("-0.25"),
    )
    assert_balances_are_the_ledger(app)


def test_the_cli_sets_limits_adjusts_shows_and_reports_usage(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    cli = app.test_cli_runner()
    assert cli.invoke(args=["accounts", "limit", "acme", "20", "--per", "total"]).exit_code == 0
    submit_and_finish(
        app, api_key, upstream, final("t-a", "SUCCEEDED", {"duration": 4.5, "SR": "720"})
    )
    adjusted = cli.invoke(args=["accounts", "adjust", "acme", "-1.5", "--reason", "goodwill debit"])
    assert adjusted.exit_code == 0, adjusted.output
    assert "debited 1.50 CNY" in adjusted.output

    shown = cli.invoke(args=["accounts", "show", "acme"]).output
    usage = cli.invoke(args=["usage", "--by", "account,model", "--format", "csv"]).output
    as_json = json.loads(cli.invoke(args=["usage", "--by", "day", "--format", "json"]).output)
    table = cli.invoke(args=["usage", "--account", "acme"]).output

    assert "limit:     20.00 CNY in total" in shown
    assert "spent:     4.20 CNY" in shown  # 4.5 s x 0.6 = 2.70, and 1.50 debited
    assert "remaining: 15.80 CNY" in shown
    assert usage.splitlines() == [
        "account,model,kind,tasks,seconds,amount,currency",
        "acme,,adjustment,0,0,1.500000,CNY",  # a debit adds to what was spent, as a charge
        f"acme,{MODEL},charge,1,4.500,2.700000,CNY",
    ]
    assert [row["kind"] for row in as_json] == ["adjustment", "charge"]
    assert as_json[0]["day"] == utcnow().strftime("%Y-%m-%d")
    assert "2.70" in table
    unlimited = cli.invoke(args=["accounts", "limit", "acme", "none"])
    assert "no spending limit" in unlimited.output
    assert cli.invoke(args=["accounts", "show", "nobody"]).exit_code != 0


# --------------------------------------------------------------------------- the clock

JANUARY_END = "2027-01-31T23:50:00Z"


@pytest.fixture
def clocked(make_app: Callable[..., Flask]) -> Iterator[Flask]:
    """Return the app on the base config with its clock started late in January 2027."""
    app = make_app(GATEWAY_CLOCK_START=JANUARY_END)
    yield app
    app.extensions["gateway"].engine.dispose()


def clock_of(app: Flask) -> RunningClock:
    """Return the app's test clock."""
    clock = app.extensions["gateway"].clock
    assert isinstance(clock, RunningClock)
    return clock


def task_url(task_id: str, base: str = PRIMARY) -> str:
    """Return DashScope's URL of a task."""
    return f"{base}/api/v1/tasks/{task_id}"


def poll(app: Flask, key: str, task_id: str) -> Any:
    """Query a task through the gateway."""
    return app.test_client().get(f"/alibailian/api/v1/tasks/{task_id}", headers=bearer(key))


def test_the_clock_is_utcnow_unless_a_test_starts_one() -> None:
    assert clock_from({}) is utcnow
    assert clock_from({"GATEWAY_CLOCK_START": ""}) is utcnow
    started = clock_from({"GATEWAY_CLOCK_START": "2027-01-31T23:50:00Z"})
    first = started()
    assert datetime(2027, 1, 31, 23, 50) <= first < datetime(2027, 1, 31, 23, 51)
    assert started() >= first  # it runs on
    assert parse_instant("2027-02-01T08:00:00+08:00") == datetime(2027, 2, 1, 0, 0)
    assert parse_instant("2027-02-01 00:00:05") == datetime(2027, 2, 1, 0, 0, 5)
    with pytest.raises(ValueError, match="GATEWAY_CLOCK_START: 'last tuesday' is not an ISO"):
        clock_from({"GATEWAY_CLOCK_START": "last tuesday"})


def test_a_month_rolls_over_on_the_gateway_clock_and_a_january_task_counts_in_january(
    clocked: Flask, upstream: responses.RequestsMock
) -> None:
    app, gateway = clocked, clocked.extensions["gateway"]
    key = new_key(app, "monthly")
    ledger.set_limit(gateway.engine, "monthly", Limit(Decimal(3), "month"), gateway.clock())
    client = app.test_client()
    for task_id in ("t-jan-1", "t-jan-2", "t-feb"):
        upstream.post(UPSTREAM_SUBMIT, json=accepted(task_id))

    january = [
        client.post(SUBMIT_PATH, json=body(duration=5), headers=bearer(key)) for _ in range(3)
    ]
    assert [answer.status_code for answer in january] == [200, 200, 400]
    assert january[2].json is not None
    assert january[2].json["code"] == "Arrearage"
    assert [answer.headers.get("X-Gateway-Remaining") for answer in january] == [
        "1.50",
        "0.00",
        None,
    ]
    clock_of(app).set(datetime(2027, 2, 1, 0, 10))
    february = client.post(SUBMIT_PATH, json=body(duration=5), headers=bearer(key))
    assert february.status_code == 200
    assert february.headers["X-Gateway-Remaining"] == "1.50"  # the limit starts afresh

    # Reserved in January, finished (and settled) in February: it counts in January.
    upstream.get(task_url("t-jan-1"), json=final("t-jan-1", "SUCCEEDED", {"duration": 4}))
    assert poll(app, key, "t-jan-1").json["output"]["task_status"] == "SUCCEEDED"

    [charge] = [row for row in ledger_rows(app) if row.kind == "charge"]
    assert (charge.amount, charge.period) == (Decimal("1.2"), "2027-01")
    assert charge.at >= datetime(2027, 2, 1, 0, 10)
    held = {
        period: value
        for (account, period), value in ledger.balances(gateway.engine).items()
        if account == charge.account_id
    }
    assert held == {
        "2027-01": (Decimal("1.2"), Decimal("1.5")),
        "2027-02": (Decimal(0), Decimal("1.5")),
        "total": (Decimal("1.2"), Decimal(3)),
    }
    shown = app.test_cli_runner().invoke(args=["accounts", "show", "monthly"]).output
    assert "period:    2027-02" in shown
    assert "remaining: 1.50 CNY" in shown
    with gateway.engine.connect() as conn:
        sent = conn.execute(select(submissions.c.sent_at, submissions.c.billing_period)).all()
    assert sorted(period for _, period in sent) == ["2027-01", "2027-01", "2027-02"]
    assert_balances_are_the_ledger(app)


def test_the_reconciler_reads_the_gateway_clock(clocked: Flask) -> None:
    gateway = clocked.extensions["gateway"]
    assert Reconciler(gateway).clock is gateway.clock
    assert Reconciler(gateway, clock=utcnow).clock is utcnow


# --------------------------------------------------------------------------- UNKNOWN


def submit_one(app: Flask, key: str, upstream: Any, task_id: str, *answers: Any) -> None:
    """Submit a task DashScope accepts as `task_id`, which it then answers as `answers`."""
    upstream.post(UPSTREAM_SUBMIT, json=accepted(task_id))
    for answer in answers:
        upstream.get(task_url(task_id), json=answer)
    response = app.test_client().post(SUBMIT_PATH, json=body(duration=5), headers=bearer(key))
    assert response.status_code == 200


def billing_state(app: Flask, task_id: str) -> str:
    """Return a task's submission's billing state."""
    with app.extensions["gateway"].engine.connect() as conn:
        state = conn.execute(
            select(submissions.c.billing_state).where(submissions.c.task_id == task_id)
        ).scalar_one()
    return str(state)


USAGE_4S = {"duration": 4, "SR": 480, "video_count": 1}  # 4 s x 0.3 = 1.20


@pytest.mark.parametrize(
    "between",
    [pytest.param([], id="then-succeeded"), pytest.param(["RUNNING"], id="running-again")],
)
def test_a_task_released_while_unknown_is_charged_once_when_it_succeeds(
    app: Flask, api_key: str, upstream: responses.RequestsMock, between: list[str]
) -> None:
    answers = [
        final("t-unk", "UNKNOWN"),
        *(final("t-unk", status) for status in between),
        final("t-unk", "SUCCEEDED", USAGE_4S),
    ]
    submit_one(app, api_key, upstream, "t-unk", *answers)
    engine = app.extensions["gateway"].engine

    assert poll(app, api_key, "t-unk").json["output"]["task_status"] == "UNKNOWN"
    # UNKNOWN is not final: the reservation goes, the task is polled on.
    assert kinds(app) == [("reserve", Decimal("1.5")), ("release", Decimal("1.5"))]
    view = ledger.show_account(engine, "acme", utcnow())
    assert (view.spent, view.reserved, view.in_flight) == (Decimal(0), Decimal(0), 0)
    assert billing_state(app, "t-unk") == "unknown"
    for _ in between:
        poll(app, api_key, "t-unk")
    assert poll(app, api_key, "t-unk").json["output"]["task_status"] == "SUCCEEDED"
    assert poll(app, api_key, "t-unk").json["output"]["task_status"] == "SUCCEEDED"  # stored

    pricing = app.extensions["gateway"].settings.pricing
    for status in ("SUCCEEDED", "UNKNOWN", "FAILED"):  # whoever comes later settles nothing
        assert ledger.settle_task(engine, "t-unk", status, USAGE_4S, pricing, utcnow()) is None
    assert kinds(app) == [
        ("reserve", Decimal("1.5")),
        ("release", Decimal("1.5")),
        ("charge", Decimal("1.2")),
    ]
    assert billing_state(app, "t-unk") == "settled"
    view = ledger.show_account(engine, "acme", utcnow())
    assert (view.spent, view.reserved, view.in_flight) == (Decimal("1.2"), Decimal(0), 0)
    assert_balances_are_the_ledger(app)


def test_a_task_released_while_unknown_that_fails_is_charged_nothing(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit_one(app, api_key, upstream, "t-unk", final("t-unk", "UNKNOWN"), final("t-unk", "FAILED"))

    poll(app, api_key, "t-unk")
    assert poll(app, api_key, "t-unk").json["output"]["task_status"] == "FAILED"

    assert kinds(app) == [("reserve", Decimal("1.5")), ("release", Decimal("1.5"))]
    assert billing_state(app, "t-unk") == "settled"
    assert_balances_are_the_ledger(app)


def test_a_failed_settlement_after_unknown_leaves_the_task_unknown_for_the_next_poll(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    succeeded = final("t-unk", "SUCCEEDED", USAGE_4S)
    submit_one(app, api_key, upstream, "t-unk", final("t-unk", "UNKNOWN"), succeeded, succeeded)
    engine = app.extensions["gateway"].engine
    poll(app, api_key, "t-unk")

    # A real database fault: the ledger is not there while DashScope says SUCCEEDED.
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE ledger RENAME TO ledger_away"))
    try:
        during = poll(app, api_key, "t-unk")
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE ledger_away RENAME TO ledger"))

    # Not stored as SUCCEEDED: the catch-up settles reservations held, and this one is not.
    assert during.json["output"]["task_status"] == "UNKNOWN"
    assert during.headers["X-Gateway-Stale"] == "upstream_error"
    assert billing_state(app, "t-unk") == "unknown"
    assert poll(app, api_key, "t-unk").json["output"]["task_status"] == "SUCCEEDED"
    assert [kind for kind, _ in kinds(app)] == ["reserve", "release", "charge"]
    assert_balances_are_the_ledger(app)


# --------------------------------------------------------------------------- usage and headers


def test_usage_amounts_sum_to_what_was_spent_debits_positive_credits_negative(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    submit_and_finish(app, api_key, upstream, final("t-a", "SUCCEEDED", {"duration": 4.5}))
    cli = app.test_cli_runner()
    for amount in ("-1.5", "-0.25", "2"):
        done = cli.invoke(args=["accounts", "adjust", "acme", amount, "--reason", "r"])
        assert done.exit_code == 0, done.output

    csv_text = cli.invoke(args=["usage", "--by", "account", "--format", "csv"]).output
    as_json = json.loads(cli.invoke(args=["usage", "--format", "json"]).output)
    shown = cli.invoke(args=["accounts", "show", "acme"]).output

    assert csv_text.splitlines()[1:] == [
        "acme,adjustment,0,0,-0.250000,CNY",  # debits 1.75, credit 2: 0.25 less spent
        "acme,charge,1,4.500,1.350000,CNY",
    ]
    assert "spent:     1.10 CNY" in shown  # 1.35 - 0.25
    lines = csv_text.splitlines()[1:]
    assert sum(Decimal(line.split(",")[-2]) for line in lines) == Decimal("1.1")
    assert sum(Decimal(row["amount"]) for row in as_json) == Decimal("1.1")
    assert [row["tasks"] for row in as_json] == [0, 1]  # numbers, not strings


def test_a_submit_dashscope_refuses_carries_no_money_headers(
    app: Flask, api_key: str, upstream: responses.RequestsMock
) -> None:
    engine = app.extensions["gateway"].engine
    ledger.set_limit(engine, "acme", Limit(Decimal(10), "month"), utcnow())
    upstream.post(UPSTREAM_SUBMIT, status=400, json={"code": "DataInspectionFailed"})
    upstream.post(UPSTREAM_SUBMIT, json=accepted("t-1"))
    client = app.test_client()

    refused = client.post(SUBMIT_PATH, json=body(duration=5), headers=bearer(api_key))
    taken = client.post(SUBMIT_PATH, json=body(duration=5), headers=bearer(api_key))

    assert refused.status_code == 400
    assert "X-Gateway-Estimate" not in refused.headers
    assert "X-Gateway-Remaining" not in refused.headers
    assert (taken.headers["X-Gateway-Estimate"], taken.headers["X-Gateway-Remaining"]) == (
        "1.50",
        "8.50",  # the refused submit's reservation was released
    )


def test_usage_filters_by_day_bounds_and_model_and_groups_by_key(
    clocked: Flask, upstream: responses.RequestsMock
) -> None:
    app = clocked
    engine = app.extensions["gateway"].engine
    first, second = new_key(app, "acme"), new_key(app, "acme")
    intl_submit = f"{INTL}/api/v1/services/aigc/video-generation/video-synthesis"
    cases = [
        # (settled at, key, model, base, usage, amount)
        (datetime(2027, 3, 9, 23, 59, 59, 500000), first, MODEL, PRIMARY, 5, 480),
        (datetime(2027, 3, 10, 0, 0, 0), first, MODEL, PRIMARY, 4, 720),
        (datetime(2027, 3, 12, 23, 59, 59), second, "wan2.2-t2v-plus", INTL, 2, 1080),
        (datetime(2027, 3, 13, 0, 0, 0), first, MODEL, PRIMARY, 3, 480),
    ]
    for number, (moment, key, model, base, seconds, sr) in enumerate(cases):
        task_id = f"t-{number}"
        upstream.post(intl_submit if base == INTL else UPSTREAM_SUBMIT, json=accepted(task_id))
        usage = {"duration": seconds, "SR": sr}
        upstream.get(task_url(task_id, base), json=final(task_id, "SUCCEEDED", usage))
        clock_of(app).set(moment)
        parameters: dict[str, Any] = {"duration": seconds}
        if model != MODEL:
            parameters["resolution"] = "1080P"
        sent = {"model": model, "input": {"prompt": "p"}, "parameters": parameters}
        answer = app.test_client().post(SUBMIT_PATH, json=sent, headers=bearer(key))
        assert answer.status_code == 200
        clock_of(app).set(moment)
        assert poll(app, key, task_id).json["output"]["task_status"] == "SUCCEEDED"
    cli = app.test_cli_runner()

    def report(*args: str) -> list[str]:
        done = cli.invoke(args=["usage", "--format", "csv", *args])
        assert done.exit_code == 0, done.output
        return done.output.splitlines()[1:]

    # 1.50 on the 9th, 2.40 on the 10th, 2.00 on the 12th, 0.90 on the 13th.
    assert report("--since", "2027-03-10", "--until", "2027-03-12", "--by", "day") == [
        "2027-03-10,charge,1,4.000,2.400000,CNY",
        "2027-03-12,charge,1,2.000,2.000000,CNY",  # --until includes its whole day
    ]
    assert report("--since", "2027-03-10") == ["charge,3,9.000,5.300000,CNY"]
    assert report("--until", "2027-03-12") == ["charge,3,11.000,5.900000,CNY"]
    assert report("--until", "2027-03-09") == ["charge,1,5.000,1.500000,CNY"]
    assert report("--since", "2027-03-14") == []
    assert report("--model", "wan2.2-t2v-plus", "--by", "model") == [
        "wan2.2-t2v-plus,charge,1,2.000,2.000000,CNY"
    ]
    callers = {key: find_caller(engine, hash_secret(key)) for key in (first, second)}
    ids = {caller.key_id: key for key, caller in callers.items() if caller is not None}
    by_key = json.loads(cli.invoke(args=["usage", "--by", "key", "--format", "json"]).output)
    assert {(ids[int(row["key"])], row["tasks"], row["amount"]) for row in by_key} == {
        (first, 3, "4.800000"),
        (second, 1, "2.000000"),
    }
    bad = cli.invoke(args=["usage", "--since", "10/03/2027"])
    assert bad.exit_code == 2
    assert "expected YYYY-MM-DD" in bad.output
