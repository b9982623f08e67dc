"""Webhooks: URLs each key's sandbox events are POSTed to.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), index=True),
        sa.Column("url", sa.Text),
        sa.Column("secret", sa.Text),
        sa.Column("events", sa.Text),
        sa.Column("created_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("webhooks")
