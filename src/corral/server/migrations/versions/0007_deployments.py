"""Deployments: long-running services with a stable URL, and the sandbox serving each.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id")),
        sa.Column("name", sa.String(64), unique=True),
        sa.Column("spec", sa.Text),
        sa.Column("version", sa.Integer),
        sa.Column("instance", sa.String(32), nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float),
        sa.Column("updated_at", sa.Float),
    )


def downgrade() -> None:
    op.drop_table("deployments")
