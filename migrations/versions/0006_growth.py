"""growth: task counts kept by triggers, list indexes in filter order, in-flight index

The total of a task list is summed from task_counts instead of counted row by row; the list's
indexes put each filter's equalities before the submit time; the reconciler's scan of the
submissions in flight reads a partial index in its own order.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Written out, as in 0002: a migration keeps meaning what it meant when it was written.
_IN_FLIGHT = sa.text("state = 'in_flight'")
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
_SQLITE_TRIGGERS = (
    f"CREATE TRIGGER tasks_counted_insert AFTER INSERT ON tasks BEGIN {_SQLITE_ADD} END",
    f"CREATE TRIGGER tasks_counted_delete AFTER DELETE ON tasks BEGIN {_SQLITE_REMOVE} END",
    "CREATE TRIGGER tasks_counted_update AFTER UPDATE OF status, account_id, model, "
    "submitted_at ON tasks WHEN OLD.status IS NOT NEW.status "
    "OR OLD.account_id IS NOT NEW.account_id OR OLD.model IS NOT NEW.model "
    f"OR OLD.submitted_at IS NOT NEW.submitted_at BEGIN {_SQLITE_REMOVE} {_SQLITE_ADD} END",
)
_POSTGRESQL_TRIGGERS = (
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
_BACKFILL = {
    "sqlite": "INSERT INTO task_counts (account_id, model, status, hour, n) "
    "SELECT account_id, model, status, substr(submitted_at, 1, 13) || ':00:00.000000', COUNT(*) "
    "FROM tasks GROUP BY 1, 2, 3, 4",
    "postgresql": "INSERT INTO task_counts (account_id, model, status, hour, n) "
    "SELECT account_id, model, status, date_trunc('hour', submitted_at), COUNT(*) "
    "FROM tasks GROUP BY 1, 2, 3, 4",
}


def upgrade() -> None:
    """Add task_counts, filled from tasks and kept by triggers; reshape the list indexes."""
    op.create_table(
        "task_counts",
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("hour", sa.DateTime(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "model", "status", "hour"),
    )
    dialect = op.get_bind().dialect.name
    # Filled and triggered in the one transaction the gateway migrates in, under its lock:
    # no task is written between the two, so none is counted twice or missed.
    op.execute(_BACKFILL[dialect])
    for statement in _SQLITE_TRIGGERS if dialect == "sqlite" else _POSTGRESQL_TRIGGERS:
        op.execute(statement)

    op.drop_index("ix_tasks_account_model_submitted", table_name="tasks")
    op.create_index(
        "ix_tasks_account_model_submitted", "tasks", ["account_id", "model", "submitted_at"]
    )
    op.create_index(
        "ix_tasks_account_model_status_submitted",
        "tasks",
        ["account_id", "model", "status", "submitted_at"],
    )
    op.drop_index("ix_submissions_in_flight", table_name="submissions")
    op.create_index(
        "ix_submissions_in_flight",
        "submissions",
        ["sent_at", "id"],
        sqlite_where=_IN_FLIGHT,
        postgresql_where=_IN_FLIGHT,
    )


def downgrade() -> None:
    """Drop task_counts and its triggers; put back 0004's list and in-flight indexes."""
    op.drop_index("ix_submissions_in_flight", table_name="submissions")
    op.create_index(
        "ix_submissions_in_flight",
        "submissions",
        ["channel", "sent_at"],
        sqlite_where=_IN_FLIGHT,
        postgresql_where=_IN_FLIGHT,
    )
    op.drop_index("ix_tasks_account_model_status_submitted", table_name="tasks")
    op.drop_index("ix_tasks_account_model_submitted", table_name="tasks")
    op.create_index(
        "ix_tasks_account_model_submitted",
        "tasks",
        ["account_id", "model", "status", "submitted_at"],
    )
    if op.get_bind().dialect.name == "sqlite":
        for name in ("tasks_counted_insert", "tasks_counted_delete", "tasks_counted_update"):
            op.execute(f"DROP TRIGGER {name}")
    else:
        op.execute("DROP TRIGGER tasks_counted_insert_delete ON tasks")
        op.execute("DROP TRIGGER tasks_counted_update ON tasks")
        op.execute("DROP FUNCTION tasks_counted()")
    op.drop_table("task_counts")
