"""call_counts: calls of rate-limited routes per key and second, shared by every worker

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 20:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the call_counts table."""
    op.create_table(
        "call_counts",
        sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("scope", sa.String(32), primary_key=True),
        sa.Column("second", sa.BigInteger, primary_key=True),
        sa.Column("calls", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    """Drop the call_counts table."""
    op.drop_table("call_counts")
