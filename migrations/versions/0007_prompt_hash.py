"""prompt hash: what DashScope's task query echoes of a submit, to tell two accounts' apart

A task query's SUCCEEDED answer carries `orig_prompt`; the submission's hash of its prompt lets
the reconciler tell which of two accounts' submissions left in flight created a task. NULL for
submissions written before this revision, or without a prompt: those are told apart as before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 19:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add submissions.prompt_sha256."""
    # A nullable column without a default: ALTER TABLE on both backends, no copy of the table.
    op.add_column("submissions", sa.Column("prompt_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop submissions.prompt_sha256."""
    # Native DROP COLUMN (SQLite 3.35+, PostgreSQL): the table and its indexes stay as they are.
    op.drop_column("submissions", "prompt_sha256")
