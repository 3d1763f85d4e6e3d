"""billing: estimates and billing state on submissions, account limits, balances, the ledger

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out, as in 0002: a migration keeps meaning what it meant when it was written.
_RESERVED = sa.text("billing_state = 'reserved'")


def _money() -> sa.Numeric:  # type: ignore[type-arg]
    return sa.Numeric(18, 6)


def _seconds() -> sa.Numeric:  # type: ignore[type-arg]
    return sa.Numeric(12, 3)


def upgrade() -> None:
    """Add what a submission reserved, account limits and balances, and the ledger."""
    with op.batch_alter_table("submissions") as batch:
        batch.add_column(sa.Column("estimate", _money(), nullable=True))
        batch.add_column(sa.Column("estimate_tier", sa.String(16), nullable=True))
        batch.add_column(sa.Column("estimate_seconds", _seconds(), nullable=True))
        batch.add_column(sa.Column("billing_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("billing_period", sa.String(7), nullable=True))
    op.create_index(
        "ix_submissions_reserved",
        "submissions",
        ["sent_at"],
        sqlite_where=_RESERVED,
        postgresql_where=_RESERVED,
    )
    op.create_table(
        "account_limits",
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("amount", _money(), nullable=False),
        sa.Column("per", sa.String(8), nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "account_balances",
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("period", sa.String(7), primary_key=True),
        sa.Column("spent", _money(), nullable=False),
        sa.Column("reserved", _money(), nullable=False),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("key_id", sa.Integer, nullable=True),
        sa.Column("submission_id", sa.Integer, nullable=True),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", _money(), nullable=False),
        sa.Column("seconds", _seconds(), nullable=True),
        sa.Column("tier", sa.String(16), nullable=True),
        sa.Column("period", sa.String(7), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
    )
    op.create_index("ix_ledger_at", "ledger", ["at"])
    op.create_index("ix_ledger_account_at", "ledger", ["account_id", "at"])


def downgrade() -> None:
    """Drop the ledger, balances and limits, and what submissions reserved."""
    op.drop_index("ix_ledger_account_at", table_name="ledger")
    op.drop_index("ix_ledger_at", table_name="ledger")
    op.drop_table("ledger")
    op.drop_table("account_balances")
    op.drop_table("account_limits")
    op.drop_index("ix_submissions_reserved", table_name="submissions")
    with op.batch_alter_table("submissions") as batch:
        for column in ("billing_period", "billing_state", "estimate_seconds", "estimate_tier"):
            batch.drop_column(column)
        batch.drop_column("estimate")
