"""The tables of the gateway's database (SQLAlchemy Core); times are naive UTC.

The schema is managed by Alembic (migrations/): a change here needs a migration there.
"""

from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    TypeDecorator,
    event,
)
from sqlalchemy.engine import Connection, Dialect

metadata = MetaData()

# Once a task reaches one of these, DashScope never changes it again.
FINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELED"})

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_at", DateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    # sha256 of the secret: keys are 192 random bits, so a fast hash cannot be brute-forced.
    Column("secret_hash", String(64), nullable=False, unique=True),
    # The last characters only, so an operator can tell keys apart in `keys list`.
    Column("hint", String(16), nullable=False),
    # Comma-separated model allowlist; NULL means every offered model.
    Column("models", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("revoked_at", DateTime, nullable=True),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("channel", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    # The last upstream answer about this task, as DashScope sent it.
    Column("upstream_body", Text, nullable=False),
    Column("submitted_at", DateTime, nullable=False),
    Column("refreshed_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
)

# Every documented filter of `GET /tasks` reads one of these in submit order, and counts the
# edges of its time range on it (task_counts has the rest): each filter's equalities, then the
# submit time, so that the range is one contiguous stretch of the index.
Index("ix_tasks_account_submitted", tasks.c.account_id, tasks.c.submitted_at)
Index("ix_tasks_account_status_submitted", tasks.c.account_id, tasks.c.status, tasks.c.submitted_at)
Index("ix_tasks_account_model_submitted", tasks.c.account_id, tasks.c.model, tasks.c.submitted_at)
Index(
    "ix_tasks_account_model_status_submitted",
    tasks.c.account_id,
    tasks.c.model,
    tasks.c.status,
    tasks.c.submitted_at,
)
# The reconciler's scans: running tasks by last refresh, and the retention sweep by submit time.
_RUNNING = tasks.c.status.not_in(sorted(FINAL_STATUSES))
Index(
    "ix_tasks_running_refreshed",
    tasks.c.refreshed_at,
    sqlite_where=_RUNNING,
    postgresql_where=_RUNNING,
)
Index("ix_tasks_submitted", tasks.c.submitted_at)

# How many of the hot table's tasks there are per account, model, status and hour of submit:
# the `total` of a task list is a sum over a few of these rows plus an exact count of the two
# partial hours at the edges of its time range, where COUNT(*) over the index alone read every
# matching entry (97 ms for 900k tasks on SQLite, 146 ms on PostgreSQL). Triggers on tasks keep
# it, in the transaction of each insert, status change and delete, whichever code (or operator)
# writes them: a count kept by each writer would be wrong the day one writer forgets.
task_counts = Table(
    "task_counts",
    metadata,
    Column("account_id", Integer, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("status", String(32), primary_key=True),
    # The submit time truncated to the hour.
    Column("hour", DateTime, primary_key=True),
    Column("n", Integer, nullable=False),
)

# The triggers, written out as the migration that made them (0006) has them. On SQLite the hour
# is cut from the text SQLAlchemy stores ("YYYY-MM-DD HH:MM:SS.ffffff"): strftime('%s') rounds
# 20:59:59.999999 up into the next hour. No foreign key: each count would pay for its check.
_SQLITE_ADD = (
    "INSERT INTO task_counts (account_id, model, status, hour, n) "
    "VALUES (NEW.account_id, NEW.model, NEW.status, "
    "substr(NEW.submitted_at, 1, 13) || ':00:00.000000', 1) "
    "ON CONFLICT (account_id, model, status, hour) DO UPDATE SET n = n + 1;"
)
_SQLITE_REMOVE = (
    "UPDATE task_counts SET n = n - 1 WHERE account_id = OLD.account_id AND model = OLD.model "
    "AND status = OLD.status AND hour = substr(OLD.submitted_at, 1, 13) || ':00:00.000000';"
)
_COUNTED = "OLD.status, OLD.account_id, OLD.model, OLD.submitted_at"
_COUNTED_NEW = "NEW.status, NEW.account_id, NEW.model, NEW.submitted_at"
SQLITE_COUNT_TRIGGERS = (
    f"CREATE TRIGGER tasks_counted_insert AFTER INSERT ON tasks BEGIN {_SQLITE_ADD} END",
    f"CREATE TRIGGER tasks_counted_delete AFTER DELETE ON tasks BEGIN {_SQLITE_REMOVE} END",
    "CREATE TRIGGER tasks_counted_update AFTER UPDATE OF status, account_id, model, "
    "submitted_at ON tasks WHEN OLD.status IS NOT NEW.status "
    "OR OLD.account_id IS NOT NEW.account_id OR OLD.model IS NOT NEW.model "
    f"OR OLD.submitted_at IS NOT NEW.submitted_at BEGIN {_SQLITE_REMOVE} {_SQLITE_ADD} END",
)
POSTGRESQL_COUNT_TRIGGERS = (
    """CREATE OR REPLACE FUNCTION tasks_counted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE task_counts SET n = n - 1
        WHERE account_id = OLD.account_id AND model = OLD.model AND status = OLD.status
            AND hour = date_trunc('hour', OLD.submitted_at);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO task_counts (account_id, model, status, hour, n)
        VALUES (NEW.account_id, NEW.model, NEW.status, date_trunc('hour', NEW.submitted_at), 1)
        ON CONFLICT (account_id, model, status, hour) DO UPDATE SET n = task_counts.n + 1;
    END IF;
    RETURN NULL;
END
$$""",
    "CREATE TRIGGER tasks_counted_insert_delete AFTER INSERT OR DELETE ON tasks "
    "FOR EACH ROW EXECUTE FUNCTION tasks_counted()",
    "CREATE TRIGGER tasks_counted_update AFTER UPDATE OF status, account_id, model, "
    f"submitted_at ON tasks FOR EACH ROW WHEN (({_COUNTED}) IS DISTINCT FROM ({_COUNTED_NEW})) "
    "EXECUTE FUNCTION tasks_counted()",
)


def _create_count_triggers(_table: Table, connection: Connection, **_kw: Any) -> None:
    """Make the triggers of task_counts when metadata.create_all makes the tasks table."""
    dialect = connection.dialect.name
    for statement in SQLITE_COUNT_TRIGGERS if dialect == "sqlite" else POSTGRESQL_COUNT_TRIGGERS:
        connection.exec_driver_sql(statement)


# metadata.create_all (the tests' reference schemas) makes the triggers as the migration does.
event.listen(tasks, "after_create", _create_count_triggers)


class _Undriven(Numeric):  # type: ignore[type-arg]
    """NUMERIC in the DDL, with no conversion of values on their way to or from the driver."""

    def bind_processor(self, dialect: Dialect) -> None:
        """Pass values to the driver as they are."""
        return None

    def result_processor(self, dialect: Dialect, coltype: object) -> None:
        """Return the driver's values as they are."""
        return None


class Exact(TypeDecorator[Decimal]):
    """An exact decimal: NUMERIC(precision, scale), Decimal in Python, never a float.

    SQLite has no decimal type (SQLAlchemy would pass floats), so there the column holds the
    integer count of units of the last place (millionths of the currency for money): sums,
    comparisons and the limit check stay exact in SQL too.
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision, scale, asdecimal=True)
        self.precision = precision
        self.scale = scale
        self.unit = Decimal(1).scaleb(-scale)

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        """Return NUMERIC whose values SQLAlchemy leaves alone on SQLite."""
        if dialect.name == "sqlite":
            return dialect.type_descriptor(_Undriven(self.precision, self.scale))
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        """Return the value as the database keeps it."""
        if value is None:
            return None
        number = Decimal(value).quantize(self.unit)
        return int(number.scaleb(self.scale)) if dialect.name == "sqlite" else number

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        """Return the database's value as an exact Decimal of the column's scale."""
        if value is None:
            return None
        if dialect.name == "sqlite":
            return Decimal(int(value)).scaleb(-self.scale).quantize(self.unit)
        return Decimal(value).quantize(self.unit)


def Money() -> Exact:
    """Return the type of an amount of money: six decimal places of the currency."""
    return Exact(18, 6)


def Seconds() -> Exact:
    """Return the type of seconds of video: to the millisecond."""
    return Exact(12, 3)


# One row per submit, written before it leaves for DashScope: a billed task can always be traced
# to the account that asked for it, even when the answer never arrives or cannot be recorded.
submissions = Table(
    "submissions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("model", String(200), nullable=False),
    # The channel the submit is (or was last) sent to: failover updates it before each attempt.
    Column("channel", String(200), nullable=False),
    Column("service_path", String(200), nullable=False),
    Column("body_sha256", String(64), nullable=False),
    # in_flight: sent or about to be, no answer recorded; accepted: task_id is DashScope's task;
    # not_created: DashScope provably created nothing; ambiguous: an operator must decide.
    Column("state", String(16), nullable=False),
    Column("task_id", String(64), nullable=True, unique=True),
    Column("sent_at", DateTime, nullable=False),
    Column("resolved_at", DateTime, nullable=True),
    # answer, journal or reconciler: who recorded the outcome.
    Column("resolved_by", String(16), nullable=True),
    # What the submit was estimated to cost (reserved against the account), and from what.
    Column("estimate", Money(), nullable=True),
    Column("estimate_tier", String(16), nullable=True),
    Column("estimate_seconds", Seconds(), nullable=True),
    # reserved -> settled (charged and released) or released (created nothing); NULL: unbilled.
    # Each move is a conditional update from `reserved`: whoever makes it writes the ledger.
    Column("billing_state", String(16), nullable=True),
    # The calendar month (UTC, YYYY-MM) the reservation, and so its charge, counts in.
    Column("billing_period", String(7), nullable=True),
    # SHA-256 of `input.prompt`, which a SUCCEEDED task query echoes (`orig_prompt`): how the
    # reconciler tells two accounts' submissions apart. NULL: no prompt, or written before it.
    # Last, where ALTER TABLE ADD COLUMN (migration 0007) puts it.
    Column("prompt_sha256", String(64), nullable=True),
)

# The reconciler reads every submission in flight, oldest first: few rows of a large table.
_IN_FLIGHT = submissions.c.state == "in_flight"
Index(
    "ix_submissions_in_flight",
    submissions.c.sent_at,
    submissions.c.id,
    sqlite_where=_IN_FLIGHT,
    postgresql_where=_IN_FLIGHT,
)
Index("ix_submissions_sent", submissions.c.sent_at)
_RESERVED = submissions.c.billing_state == "reserved"
Index(
    "ix_submissions_reserved",
    submissions.c.sent_at,
    sqlite_where=_RESERVED,
    postgresql_where=_RESERVED,
)

# Who runs the reconciler now: one holder across every worker and instance, until it expires.
leases = Table(
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", DateTime, nullable=False),
)

# Tasks past the retention window, moved out of the hot table with what usage reports need.
task_archive = Table(
    "task_archive",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, ForeignKey("api_keys.id"), nullable=False),
    Column("channel", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("status", String(32), nullable=False),
    # DashScope's `usage` object of the last answer, as JSON text; NULL when it sent none.
    Column("usage", Text, nullable=True),
    Column("submitted_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    Column("archived_at", DateTime, nullable=False),
)

Index("ix_task_archive_account_submitted", task_archive.c.account_id, task_archive.c.submitted_at)

# An account's spending limit: per calendar month (UTC) or in total (prepaid credit).
account_limits = Table(
    "account_limits",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("amount", Money(), nullable=False),
    # month or total
    Column("per", String(8), nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

# What an account has spent and holds reserved, per month ("YYYY-MM") and in total ("total"):
# a cache of the ledger's sums, kept in the same transactions as the ledger rows, so that the
# limit check and a reservation can be one conditional update.
account_balances = Table(
    "account_balances",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("period", String(7), primary_key=True),
    Column("spent", Money(), nullable=False),
    Column("reserved", Money(), nullable=False),
)

# Every movement of money, never edited: reserve, charge, release, adjustment. Amounts are
# positive but an adjustment's (positive credits the account, negative debits it).
ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime, nullable=False),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", Integer, nullable=True),
    Column("submission_id", Integer, nullable=True),
    Column("task_id", String(64), nullable=True),
    Column("model", String(200), nullable=True),
    Column("kind", String(16), nullable=False),
    Column("amount", Money(), nullable=False),
    # Seconds of output video a charge is for, and its resolution tier.
    Column("seconds", Seconds(), nullable=True),
    Column("tier", String(16), nullable=True),
    # The month (YYYY-MM) whose balance the row counts in.
    Column("period", String(7), nullable=False),
    Column("reason", Text, nullable=True),
)

Index("ix_ledger_at", ledger.c.at)
Index("ix_ledger_account_at", ledger.c.account_id, ledger.c.at)

# The upload directories DashScope's getPolicy gave out through the gateway: an `oss://` input
# may name a file only under a directory its account obtained, for the same model, and goes to
# the channel (DashScope account) that holds the file. DashScope keeps the files 48 h.
uploads = Table(
    "uploads",
    metadata,
    Column("upload_dir", String(512), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("channel", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
)
# The sticky channel of an account and model: its newest upload still valid.
Index(
    "ix_uploads_account_model_expires", uploads.c.account_id, uploads.c.model, uploads.c.expires_at
)

# Calls of a rate-limited route per gateway key and second, counted in the database so that a
# limit holds across every worker and instance; the reconciler forgets the past seconds.
call_counts = Table(
    "call_counts",
    metadata,
    Column("key_id", Integer, ForeignKey("api_keys.id"), primary_key=True),
    Column("scope", String(32), primary_key=True),
    Column("second", BigInteger, primary_key=True),
    Column("calls", Integer, nullable=False),
)
