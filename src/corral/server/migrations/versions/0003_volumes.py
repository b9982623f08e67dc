"""Persistent volumes each key made, by name.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("size_mb", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_volumes_owner_name", "volumes", ["owner", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_volumes_owner_name", "volumes")
    op.drop_table("volumes")
