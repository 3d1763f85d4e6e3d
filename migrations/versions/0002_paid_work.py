"""paid work: submissions written ahead, the reconciler's lease, the task archive, and indexes

The tables and indexes commit ea46f61 added to app/store/tables.py.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The statuses DashScope never changes again (tables.FINAL_STATUSES), written out: a migration
# keeps meaning what it meant when it was written, whatever the tables module says later. In
# the parentheses SQLAlchemy puts around tables.py's expression: SQLite keeps the text as given.
_RUNNING = sa.text("(status NOT IN ('CANCELED', 'FAILED', 'SUCCEEDED'))")
_IN_FLIGHT = sa.text("state = 'in_flight'")


def upgrade() -> None:
    """Add the list and reconciler indexes of tasks, and submissions, leases, task_archive."""
    op.create_index(
        "ix_tasks_account_status_submitted", "tasks", ["account_id", "status", "submitted_at"]
    )
    op.create_index(
        "ix_tasks_account_model_submitted",
        "tasks",
        ["account_id", "model", "status", "submitted_at"],
    )
    op.create_index(
        "ix_tasks_running_refreshed",
        "tasks",
        ["refreshed_at"],
        sqlite_where=_RUNNING,
        postgresql_where=_RUNNING,
    )
    op.create_index("ix_tasks_submitted", "tasks", ["submitted_at"])

    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("channel", sa.String(length=200), nullable=False),
        sa.Column("service_path", sa.String(length=200), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=False),
        sa.Column("resolved_at", sa.DateTime(), nullable=True),
        sa.Column("resolved_by", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("task_id"),
    )
    op.create_index(
        "ix_submissions_in_flight",
        "submissions",
        ["channel", "sent_at"],
        sqlite_where=_IN_FLIGHT,
        postgresql_where=_IN_FLIGHT,
    )
    op.create_index("ix_submissions_sent", "submissions", ["sent_at"])

    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )

    op.create_table(
        "task_archive",
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=200), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("usage", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("archived_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("task_id"),
    )
    op.create_index(
        "ix_task_archive_account_submitted", "task_archive", ["account_id", "submitted_at"]
    )


def downgrade() -> None:
    """Drop what upgrade added: the archived tasks and the submissions' journal go with it."""
    op.drop_index("ix_task_archive_account_submitted", table_name="task_archive")
    op.drop_table("task_archive")
    op.drop_table("leases")
    op.drop_index("ix_submissions_sent", table_name="submissions")
    op.drop_index("ix_submissions_in_flight", table_name="submissions")
    op.drop_table("submissions")
    op.drop_index("ix_tasks_submitted", table_name="tasks")
    op.drop_index("ix_tasks_running_refreshed", table_name="tasks")
    op.drop_index("ix_tasks_account_model_submitted", table_name="tasks")
    op.drop_index("ix_tasks_account_status_submitted", table_name="tasks")
