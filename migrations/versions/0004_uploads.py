"""uploads: the upload directories getPolicy gave out, bound to account, channel and model

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 14:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the uploads table and its index for the sticky channel of an account and model."""
    op.create_table(
        "uploads",
        sa.Column("upload_dir", sa.String(512), primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("channel", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    op.create_index(
        "ix_uploads_account_model_expires", "uploads", ["account_id", "model", "expires_at"]
    )


def downgrade() -> None:
    """Drop the uploads table."""
    op.drop_index("ix_uploads_account_model_expires", table_name="uploads")
    op.drop_table("uploads")
