"""The tables of the gateway's database (SQLAlchemy Core); times are naive UTC."""

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

Index("ix_tasks_account_submitted", tasks.c.account_id, tasks.c.submitted_at)
