"""stored answers without a BOM: rows recorded before answers were decoded by JSON's rules

Before, an answer that began with a UTF-8 byte order mark was stored with it, and every later
query of its task failed to parse it. Answers are now decoded and stored as UTF-8 without one;
this removes the mark from the rows stored before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 20:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

BOM = "\ufeff"


def upgrade() -> None:
    """Remove a leading byte order mark from the stored answers of tasks."""
    body = sa.column("upstream_body", sa.Text)
    op.execute(
        sa.table("tasks", body)
        .update()
        .where(sa.func.substr(body, 1, 1) == BOM)
        .values(upstream_body=sa.func.substr(body, 2))
    )


def downgrade() -> None:
    """Leave the answers as they are: without the mark they read the same to every revision."""
