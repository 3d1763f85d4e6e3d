"""The tables of the gateway's database (SQLAlchemy Core); times are naive UTC.

The schema is managed by Alembic (migrations/): a change here needs a migration there.
"""

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

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

# Every documented filter of `GET /tasks` reads one of these in submit order, and counts on it.
Index("ix_tasks_account_submitted", tasks.c.account_id, tasks.c.submitted_at)
Index("ix_tasks_account_status_submitted", tasks.c.account_id, tasks.c.status, tasks.c.submitted_at)
Index(
    "ix_tasks_account_model_submitted",
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
)

_IN_FLIGHT = submissions.c.state == "in_flight"
Index(
    "ix_submissions_in_flight",
    submissions.c.channel,
    submissions.c.sent_at,
    sqlite_where=_IN_FLIGHT,
    postgresql_where=_IN_FLIGHT,
)
Index("ix_submissions_sent", submissions.c.sent_at)

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
