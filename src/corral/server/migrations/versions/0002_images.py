"""Built images each key may use, and the names it gave them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_images_owner_name", "images", ["owner", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_images_owner_name", "images")
    op.drop_table("images")
