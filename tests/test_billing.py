"""Money in the app: reserved at submit, refused past the limit, released, settled once."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import select

from app.billing import ledger
from app.billing.ledger import Limit, LimitExceeded, Reservation
from app.billing.prices import Estimate
from app.reconcile import Reconciler
from app.store import find_caller, hash_secret, record_answer, utcnow
from app.store.submissions import write_ahead
from app.store.tables import account_balances, submissions
from app.store.tables import ledger as ledger_table
from tests.conftest import PRIMARY, SUBMIT_PATH, bearer, new_key

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
        "acme,,adjustment,0,0,-1.500000,CNY",
        f"acme,{MODEL},charge,1,4.500,2.700000,CNY",
    ]
    assert [row["kind"] for row in as_json] == ["adjustment", "charge"]
    assert as_json[0]["day"] == utcnow().strftime("%Y-%m-%d")
    assert "2.70" in table
    unlimited = cli.invoke(args=["accounts", "limit", "acme", "none"])
    assert "no spending limit" in unlimited.output
    assert cli.invoke(args=["accounts", "show", "nobody"]).exit_code != 0
