"""API keys and the sandbox catalogue.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("hint", sa.String(16), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_table(
        "sandboxes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("history", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("ended_at", sa.Float, nullable=True),
        sa.Column("end_reason", sa.String(32), nullable=True),
        sa.Column("end_detail", sa.Text, nullable=True),
    )
    op.create_index("ix_sandboxes_owner_state", "sandboxes", ["owner", "state"])


def downgrade() -> None:
    op.drop_index("ix_sandboxes_owner_state", "sandboxes")
    op.drop_table("sandboxes")
    op.drop_table("api_keys")
