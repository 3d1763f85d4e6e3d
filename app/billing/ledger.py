"""The ledger and the balances it sums to: reservations, charges, releases and adjustments.

Every movement of money is a ledger row written in the same transaction as the balance rows
it moves (one per account and month, one per account in total), so balances are always the
ledger's sums. The limit check and a reservation are one conditional update of a balance row:
concurrent submits on any number of workers and instances cannot together pass the limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.sql import ColumnElement

from app.billing.prices import Charge, Estimate, ModelPricing, charge_from_usage, to_cent
from app.store.engine import writing
from app.store.tables import (
    Exact,
    Money,
    account_balances,
    account_limits,
    accounts,
    ledger,
    submissions,
    task_archive,
    tasks,
)

log = logging.getLogger(__name__)

RESERVE, CHARGE, RELEASE, ADJUSTMENT = "reserve", "charge", "release", "adjustment"
KINDS = (RESERVE, CHARGE, RELEASE, ADJUSTMENT)
# A submission's billing state: each move away from RESERVED happens once.
RESERVED, SETTLED, RELEASED = "reserved", "settled", "released"
# Released while DashScope said UNKNOWN, which is not final: the task is polled on, and the
# final status it reaches later settles it once more (a SUCCEEDED is charged, nothing released).
RELEASED_UNKNOWN = "unknown"
TOTAL = "total"
PER_MONTH, PER_TOTAL = "month", "total"
# The statuses after which a task's reservation is settled: SUCCEEDED charges, others release.
SETTLING_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})
UNKNOWN = "UNKNOWN"
ZERO = Decimal(0)


def period_of(moment: datetime) -> str:
    """Return the calendar month (UTC) a moment counts in, as YYYY-MM."""
    return moment.strftime("%Y-%m")


@dataclass(frozen=True)
class Limit:
    """An account's spending limit: an amount per calendar month, or in total."""

    amount: Decimal
    per: str

    def period(self, moment: datetime) -> str:
        """Return the balance row the limit is checked against at a moment."""
        return self.period_key(period_of(moment))

    def period_key(self, month: str) -> str:
        """Return the balance row the limit is checked against in a month."""
        return month if self.per == PER_MONTH else TOTAL


class LimitExceeded(Exception):
    """A submit's estimate does not fit what remains of its account's limit."""

    def __init__(self, limit: Limit, remaining: Decimal, estimate: Decimal, currency: str) -> None:
        self.limit = limit
        self.remaining = remaining
        self.estimate = estimate
        period = "per month" if limit.per == PER_MONTH else "in total"
        super().__init__(
            f"The account's spending limit is {to_cent(limit.amount)} {currency} {period}; "
            f"{to_cent(max(remaining, ZERO))} {currency} remains, and this submit is "
            f"estimated at {to_cent(estimate)} {currency}."
        )


@dataclass(frozen=True)
class Reservation:
    """What write_ahead reserves with a submission, and against which limit."""

    estimate: Estimate
    currency: str = "CNY"


@dataclass(frozen=True)
class Reserved:
    """A reservation made: what remains of the limit after it (None: no limit)."""

    remaining: Decimal | None


@dataclass(frozen=True)
class Settlement:
    """What settling a task did: the charge (zero when it released) and the release."""

    task_id: str
    account_id: int
    model: str
    charged: Decimal
    released: Decimal
    charge: Charge | None


# --------------------------------------------------------------------------- balances


# The statements every submit runs, built once: a submit's cost is in executing them, not in
# building them again (SQLAlchemy caches the compiled form of each either way).
_GET_LIMIT = select(account_limits.c.amount, account_limits.c.per).where(
    account_limits.c.account_id == bindparam("account_id")
)
_BALANCE = select(account_balances.c.spent, account_balances.c.reserved).where(
    account_balances.c.account_id == bindparam("account_id"),
    account_balances.c.period == bindparam("period"),
)
_MOVE = (
    update(account_balances)
    .where(
        # Not the columns' own names: those are the SET clause's.
        account_balances.c.account_id == bindparam("of_account"),
        account_balances.c.period == bindparam("of_period"),
    )
    .values(
        spent=account_balances.c.spent + bindparam("more_spent", type_=Money()),
        reserved=account_balances.c.reserved + bindparam("more_reserved", type_=Money()),
    )
)
# The same move, only while spent + reserved stays within the limit: the check is the update.
_MOVE_WITHIN = _MOVE.where(
    account_balances.c.spent + account_balances.c.reserved + bindparam("more_total", type_=Money())
    <= bindparam("within", type_=Money())
)
# The limit a balance row is checked against: the month's row for a monthly limit, the total
# row for a total one; NULL for the other row, and for both when the account has none.
_LIMIT_OF_ROW = (
    select(account_limits.c.amount)
    .where(
        account_limits.c.account_id == account_balances.c.account_id,
        case((account_limits.c.per == PER_MONTH, bindparam("of_month")), else_=literal(TOTAL))
        == account_balances.c.period,
    )
    .scalar_subquery()
)
# A month's row and the total row moved by one statement, which returns them as moved. A
# submit runs it once where it ran four statements (the limit, two moves, the balance left).
_MOVE_BOTH = (
    update(account_balances)
    .where(
        account_balances.c.account_id == bindparam("of_account"),
        account_balances.c.period.in_([bindparam("of_month"), literal(TOTAL)]),
    )
    .values(
        spent=account_balances.c.spent + bindparam("more_spent", type_=Money()),
        reserved=account_balances.c.reserved + bindparam("more_reserved", type_=Money()),
    )
    .returning(
        account_balances.c.period,
        account_balances.c.spent,
        account_balances.c.reserved,
        _LIMIT_OF_ROW,
    )
)
# The same, each row only while it stays within its limit, if it has one.
_MOVE_BOTH_WITHIN = _MOVE_BOTH.where(
    _LIMIT_OF_ROW.is_(None)
    | (
        account_balances.c.spent
        + account_balances.c.reserved
        + bindparam("more_total", type_=Money())
        <= _LIMIT_OF_ROW
    )
)
_NEW_BALANCE = insert(account_balances).values(spent=ZERO, reserved=ZERO)
_LEDGER_ROW = insert(ledger)


def get_limit(conn: Connection, account_id: int) -> Limit | None:
    """Return an account's limit, or None when it has none."""
    row = conn.execute(_GET_LIMIT, {"account_id": account_id}).first()
    return None if row is None else Limit(row.amount, row.per)


def _ensure_balance(conn: Connection, account_id: int, period: str) -> None:
    if conn.execute(_BALANCE, {"account_id": account_id, "period": period}).first():
        return
    try:
        # A savepoint: another transaction creating the same row first keeps ours usable.
        with conn.begin_nested():
            conn.execute(_NEW_BALANCE, {"account_id": account_id, "period": period})
    except IntegrityError:
        pass


def _move(
    conn: Connection,
    account_id: int,
    period: str,
    *,
    spent: Decimal = ZERO,
    reserved: Decimal = ZERO,
    within: Decimal | None = None,
) -> bool:
    """Move one balance row; with `within`, only if spent + reserved stays within it."""
    params: dict[str, Any] = {
        "of_account": account_id,
        "of_period": period,
        "more_spent": spent,
        "more_reserved": reserved,
    }
    statement = _MOVE
    if within is not None:
        statement = _MOVE_WITHIN
        params |= {"more_total": spent + reserved, "within": within}
    if conn.execute(statement, params).rowcount == 1:
        return True
    _ensure_balance(conn, account_id, period)
    return conn.execute(statement, params).rowcount == 1


def _move_both(
    conn: Connection,
    account_id: int,
    month: str,
    *,
    spent: Decimal = ZERO,
    reserved: Decimal = ZERO,
    enforce_limit: bool = False,
) -> Moved:
    """Move an account's month row and its total row; with `enforce_limit`, within its limit."""
    params = {
        "of_account": account_id,
        "of_month": month,
        "more_spent": spent,
        "more_reserved": reserved,
        "more_total": spent + reserved,
    }
    statement = _MOVE_BOTH_WITHIN if enforce_limit else _MOVE_BOTH
    rows = conn.execute(statement, params).all()
    remaining = next(
        (row[3] - row.spent - row.reserved for row in rows if row[3] is not None), None
    )
    if len(rows) == 2:
        return Moved(True, remaining)
    # A row missing (the account's first move, or its month's) or a limit refusing: the rows
    # not moved yet, one at a time, each created first if it must be.
    limit = get_limit(conn, account_id) if enforce_limit else None
    moved_already = {row.period for row in rows}
    # In the order the statement above locks them: two transactions moving the same account
    # must take its rows in one order, or PostgreSQL finds them deadlocked.
    for period in (p for p in (month, TOTAL) if p not in moved_already):
        within = limit.amount if limit is not None and limit.period_key(month) == period else None
        if not _move(conn, account_id, period, spent=spent, reserved=reserved, within=within):
            return Moved(False, None)
        if within is not None:
            now_spent, now_reserved = _balance(conn, account_id, period)
            remaining = within - now_spent - now_reserved
    return Moved(True, remaining)


@dataclass(frozen=True)
class Moved:
    """Whether both balance rows moved, and what remains of the limit after (None: no limit)."""

    ok: bool
    remaining: Decimal | None


def _balance(conn: Connection, account_id: int, period: str) -> tuple[Decimal, Decimal]:
    row = conn.execute(_BALANCE, {"account_id": account_id, "period": period}).first()
    return (ZERO, ZERO) if row is None else (row.spent, row.reserved)


def _write(conn: Connection, **values: Any) -> None:
    conn.execute(_LEDGER_ROW, values)


# --------------------------------------------------------------------------- reservations


def reserve(
    conn: Connection,
    reservation: Reservation,
    *,
    account_id: int,
    key_id: int,
    submission_id: int,
    model: str,
    now: datetime,
    enforce_limit: bool = True,
) -> Reserved:
    """Reserve a submit's estimate in the caller's transaction, or raise LimitExceeded.

    Without `enforce_limit` (a task DashScope made already, found again), nothing refuses:
    the work exists and will be charged, whatever the limit says now.
    """
    month = period_of(now)
    amount = reservation.estimate.amount
    moved = _move_both(conn, account_id, month, reserved=amount, enforce_limit=enforce_limit)
    if not moved.ok:
        limit = get_limit(conn, account_id)
        assert limit is not None  # only a limit refuses
        spent, reserved = _balance(conn, account_id, limit.period_key(month))
        raise LimitExceeded(limit, limit.amount - spent - reserved, amount, reservation.currency)
    _write(
        conn,
        at=now,
        account_id=account_id,
        key_id=key_id,
        submission_id=submission_id,
        model=model,
        kind=RESERVE,
        amount=amount,
        seconds=reservation.estimate.seconds,
        tier=reservation.estimate.tier,
        period=month,
    )
    return Reserved(remaining=moved.remaining)


def release_submission(conn: Connection, submission_id: int, now: datetime) -> Decimal | None:
    """Release a submission's whole reservation once (it created nothing); None if not held."""
    row = conn.execute(
        select(
            submissions.c.account_id,
            submissions.c.key_id,
            submissions.c.model,
            submissions.c.estimate,
            submissions.c.billing_period,
        ).where(submissions.c.id == submission_id, submissions.c.billing_state == RESERVED)
    ).first()
    if row is None or not _claim(conn, submission_id, RELEASED):
        return None
    _write(
        conn,
        at=now,
        account_id=row.account_id,
        key_id=row.key_id,
        submission_id=submission_id,
        model=row.model,
        kind=RELEASE,
        amount=row.estimate,
        period=row.billing_period,
    )
    _move_both(conn, row.account_id, row.billing_period, reserved=-row.estimate)
    return Decimal(row.estimate)


def _claim(conn: Connection, submission_id: int, state: str, was: str = RESERVED) -> bool:
    """Move a submission's billing from `was` to `state`; only one caller ever succeeds."""
    return (
        conn.execute(
            update(submissions)
            .where(submissions.c.id == submission_id, submissions.c.billing_state == was)
            .values(billing_state=state)
        ).rowcount
        == 1
    )


# --------------------------------------------------------------------------- settlement


def settle_task(
    engine: Engine,
    task_id: str,
    status: str,
    usage: Any,
    pricing: Mapping[str, ModelPricing],
    now: datetime,
) -> Settlement | None:
    """Settle a finished task once: charge SUCCEEDED by its usage, release the reservation.

    UNKNOWN releases the reservation but settles nothing for good: the final status the task
    reaches later moves it on once more, and a SUCCEEDED then is charged (in the reservation's
    month, as any charge), with nothing left to release.
    """
    if status not in SETTLING_STATUSES:
        return None
    # An UNKNOWN moves a reservation held; a final status, one held or one UNKNOWN released.
    states = (RESERVED,) if status == UNKNOWN else (RESERVED, RELEASED_UNKNOWN)
    moved_to = RELEASED_UNKNOWN if status == UNKNOWN else SETTLED
    with writing(engine) as conn:
        # Twice at most: a concurrent UNKNOWN may move the reservation this read found held
        # (reserved -> unknown) before the claim; the final status must then claim that.
        for _attempt in range(2):
            row = conn.execute(
                select(
                    submissions.c.id,
                    submissions.c.account_id,
                    submissions.c.key_id,
                    submissions.c.model,
                    submissions.c.estimate,
                    submissions.c.estimate_tier,
                    submissions.c.estimate_seconds,
                    submissions.c.billing_period,
                    submissions.c.billing_state,
                ).where(submissions.c.task_id == task_id, submissions.c.billing_state.in_(states))
            ).first()
            if row is None:
                return None
            if _claim(conn, row.id, moved_to, was=row.billing_state):
                break
        else:
            return None
        held = row.billing_state == RESERVED
        charge = None
        if status == "SUCCEEDED":
            reserved = Estimate(row.estimate_tier, row.estimate_seconds, row.estimate)
            charge = charge_from_usage(pricing.get(row.model), usage, reserved, task_id)
        common = {
            "at": now,
            "account_id": row.account_id,
            "key_id": row.key_id,
            "submission_id": row.id,
            "task_id": task_id,
            "model": row.model,
            "period": row.billing_period,
        }
        if charge is not None:
            _write(
                conn,
                **common,
                kind=CHARGE,
                amount=charge.amount,
                seconds=charge.seconds,
                tier=charge.tier,
            )
        # The whole reservation goes: the charge, not the estimate, is what the task cost.
        released = row.estimate if held else ZERO
        if held:
            _write(conn, **common, kind=RELEASE, amount=released)
        charged = charge.amount if charge is not None else ZERO
        if charged or released:
            _move_both(conn, row.account_id, row.billing_period, spent=charged, reserved=-released)
    return Settlement(task_id, row.account_id, row.model, charged, released, charge)


def unsettled_final_tasks(engine: Engine, limit: int) -> list[tuple[str, str, Any]]:
    """Return (task id, status, usage) of finished tasks whose reservation is still held."""
    found: list[tuple[str, str, Any]] = []
    with engine.connect() as conn:
        for table, usage_column in ((tasks, tasks.c.upstream_body), (task_archive, None)):
            usage = usage_column if usage_column is not None else task_archive.c.usage
            rows = conn.execute(
                select(table.c.task_id, table.c.status, usage)
                .join(submissions, submissions.c.task_id == table.c.task_id)
                .where(
                    # A literal, as the partial index ix_submissions_reserved has it: SQLite
                    # reads that index (the reservations held, few) only for a query that
                    # repeats its terms, and scanned every task otherwise (180 ms at 1M).
                    submissions.c.billing_state
                    == bindparam("reserved", RESERVED, literal_execute=True),
                    table.c.status.in_(sorted(SETTLING_STATUSES)),
                )
                .limit(limit)
            ).all()
            for task_id, status, text in rows:
                found.append((task_id, status, _usage_from(text, body=table is tasks)))
    return found


def _usage_from(text: str | None, *, body: bool) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value.get("usage") if body and isinstance(value, dict) else value


def outstanding(engine: Engine) -> Decimal:
    """Return every account's reservations held now, summed."""
    with engine.connect() as conn:
        total = conn.execute(
            select(func.sum(account_balances.c.reserved)).where(account_balances.c.period == TOTAL)
        ).scalar()
    return Decimal(total or 0)


# --------------------------------------------------------------------------- operators


def _largest(money: Exact) -> Decimal:
    return Decimal(10) ** (money.precision - money.scale) - money.unit


# The largest amount a money column holds: NUMERIC(18, 6), 999999999999.999999.
LARGEST_AMOUNT = _largest(Money())
_BALANCE_TOO_LARGE = (
    f"the account's balance would pass {LARGEST_AMOUNT}, the most the ledger holds; "
    "nothing was written"
)


class AmountOutOfRange(ValueError):
    """An amount (or a balance it would make) larger than the ledger's columns hold."""


def check_amount(amount: Decimal) -> None:
    """Raise AmountOutOfRange for an amount a money column cannot hold."""
    if not amount.is_finite() or abs(amount) > LARGEST_AMOUNT:
        raise AmountOutOfRange(
            f"{amount} is more than the ledger holds (at most {LARGEST_AMOUNT} either way)"
        )


def account_id_of(conn: Connection, name: str) -> int:
    """Return the id of the account with this name, or raise LookupError."""
    found = conn.execute(select(accounts.c.id).where(accounts.c.name == name)).scalar()
    if found is None:
        raise LookupError(f"no account named {name!r}")
    return int(found)


def set_limit(engine: Engine, name: str, limit: Limit | None, now: datetime) -> None:
    """Set or remove an account's spending limit (AmountOutOfRange past what a column holds)."""
    if limit is not None:
        check_amount(limit.amount)
    with writing(engine) as conn:
        account_id = account_id_of(conn, name)
        conn.execute(account_limits.delete().where(account_limits.c.account_id == account_id))
        if limit is not None:
            conn.execute(
                insert(account_limits).values(
                    account_id=account_id, amount=limit.amount, per=limit.per, updated_at=now
                )
            )


def adjust(engine: Engine, name: str, amount: Decimal, reason: str, now: datetime) -> None:
    """Write an adjustment: a positive amount credits the account, a negative one debits it.

    Raises AmountOutOfRange, writing nothing, if a balance would pass what a column holds.
    """
    check_amount(amount)
    month = period_of(now)
    try:
        with writing(engine) as conn:
            account_id = account_id_of(conn, name)
            _write(
                conn,
                at=now,
                account_id=account_id,
                kind=ADJUSTMENT,
                amount=amount,
                period=month,
                reason=reason,
            )
            _move_both(conn, account_id, month, spent=-amount)
            # PostgreSQL refuses a NUMERIC past its precision; SQLite's integers hold more:
            # both balances checked here, before anything is committed.
            for period in (month, TOTAL):
                spent, _reserved = _balance(conn, account_id, period)
                if abs(spent) > LARGEST_AMOUNT:
                    raise AmountOutOfRange(_BALANCE_TOO_LARGE)
    except DataError:
        raise AmountOutOfRange(_BALANCE_TOO_LARGE) from None


@dataclass(frozen=True)
class AccountView:
    """What `accounts show` prints about an account."""

    name: str
    limit: Limit | None
    period: str
    spent: Decimal
    reserved: Decimal
    in_flight: int

    @property
    def remaining(self) -> Decimal | None:
        """Return what remains of the limit, or None without one."""
        return None if self.limit is None else self.limit.amount - self.spent - self.reserved


def show_account(engine: Engine, name: str, now: datetime) -> AccountView:
    """Return an account's limit, its balance in the limit's period, and its tasks in flight."""
    with engine.connect() as conn:
        account_id = account_id_of(conn, name)
        limit = get_limit(conn, account_id)
        period = limit.period(now) if limit is not None else TOTAL
        spent, reserved = _balance(conn, account_id, period)
        in_flight = conn.execute(
            select(func.count())
            .select_from(submissions)
            .where(submissions.c.account_id == account_id, submissions.c.billing_state == RESERVED)
        ).scalar_one()
    return AccountView(name, limit, period, spent, reserved, int(in_flight))


def ledger_sums(engine: Engine) -> dict[tuple[int, str], tuple[Decimal, Decimal]]:
    """Return (spent, reserved) per (account, period) recomputed from the ledger alone."""
    sums: dict[tuple[int, str], list[Decimal]] = {}
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                ledger.c.account_id, ledger.c.period, ledger.c.kind, func.sum(ledger.c.amount)
            ).group_by(ledger.c.account_id, ledger.c.period, ledger.c.kind)
        ).all()
    for account_id, period, kind, amount in rows:
        for key in ((account_id, period), (account_id, TOTAL)):
            spent_reserved = sums.setdefault(key, [ZERO, ZERO])
            amount = Decimal(amount)
            if kind == CHARGE:
                spent_reserved[0] += amount
            elif kind == ADJUSTMENT:
                spent_reserved[0] -= amount
            elif kind == RESERVE:
                spent_reserved[1] += amount
            elif kind == RELEASE:
                spent_reserved[1] -= amount
    return {key: (value[0], value[1]) for key, value in sums.items()}


def balances(engine: Engine) -> dict[tuple[int, str], tuple[Decimal, Decimal]]:
    """Return (spent, reserved) per (account, period) as the balance rows hold them."""
    with engine.connect() as conn:
        rows = conn.execute(select(account_balances)).all()
    return {(row.account_id, row.period): (row.spent, row.reserved) for row in rows}


# --------------------------------------------------------------------------- usage


USAGE_GROUPS = ("account", "model", "day", "key")


@dataclass(frozen=True)
class UsageRow:
    """One line of a usage report: its group, the kind of row, and the sums."""

    group: tuple[str, ...]
    kind: str
    amount: Decimal
    seconds: Decimal
    tasks: int


def usage(
    engine: Engine,
    *,
    account: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    by: tuple[str, ...] = (),
) -> list[UsageRow]:
    """Return charged amounts, seconds and task counts (and adjustments) from the ledger.

    Each row's amount is what it adds to what was spent, so that the amounts of a report sum
    to it: a charge and a debit (a negative adjustment) positive, a credit negative. The days
    are those of the rows (a charge's is when it was settled), `until` excluded.
    """
    day = func.substr(func.cast(ledger.c.at, _text_type()), 1, 10)
    columns = {
        "account": accounts.c.name,
        "model": func.coalesce(ledger.c.model, ""),
        "day": day,
        "key": func.coalesce(func.cast(ledger.c.key_id, _text_type()), ""),
    }
    groups = [columns[name].label(name) for name in by]
    where: list[ColumnElement[bool]] = [ledger.c.kind.in_((CHARGE, ADJUSTMENT))]
    if account is not None:
        where.append(accounts.c.name == account)
    if model is not None:
        where.append(ledger.c.model == model)
    if since is not None:
        where.append(ledger.c.at >= since)
    if until is not None:
        where.append(ledger.c.at < until)
    query = (
        select(
            *groups,
            ledger.c.kind,
            func.sum(ledger.c.amount),
            func.sum(ledger.c.seconds),
            func.count(ledger.c.task_id.distinct()),
        )
        .join(accounts, accounts.c.id == ledger.c.account_id)
        .where(and_(*where))
        .group_by(*groups, ledger.c.kind)
        .order_by(*groups, ledger.c.kind)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    n = len(groups)
    return [
        UsageRow(
            group=tuple(str(value) for value in row[:n]),
            kind=row[n],
            amount=_spent_by(row[n], Decimal(row[n + 1] or 0)),
            seconds=Decimal(row[n + 2] or 0),
            tasks=int(row[n + 3]),
        )
        for row in rows
    ]


def _spent_by(kind: str, amount: Decimal) -> Decimal:
    """Return what a sum of ledger rows of a kind adds to `spent`."""
    # An adjustment's row says what it credits (spent = charges - adjustments): the opposite.
    return ZERO - amount if kind == ADJUSTMENT else amount


def _text_type() -> String:
    return String()


__all__ = [
    "ADJUSTMENT",
    "CHARGE",
    "KINDS",
    "LARGEST_AMOUNT",
    "RELEASE",
    "RESERVE",
    "AccountView",
    "AmountOutOfRange",
    "Limit",
    "LimitExceeded",
    "Reservation",
    "Reserved",
    "Settlement",
    "UsageRow",
    "adjust",
    "balances",
    "check_amount",
    "ledger_sums",
    "outstanding",
    "period_of",
    "release_submission",
    "reserve",
    "set_limit",
    "settle_task",
    "show_account",
    "unsettled_final_tasks",
    "usage",
]
