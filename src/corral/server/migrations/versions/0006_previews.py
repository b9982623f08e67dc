"""Previews: ports of sandboxes opened to HTTP clients, with their tokens' digests.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "previews",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id")),
        sa.Column("sandbox_id", sa.String(32)),
        sa.Column("port", sa.Integer),
        sa.Column("public", sa.Boolean, default=False),
        sa.Column("digest", sa.String(64), unique=True),
        sa.Column("created_at", sa.Float),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revoked_at", sa.Float, nullable=True),
    )
    op.create_index("ix_previews_sandbox", "previews", ["sandbox_id", "port"])


def downgrade() -> None:
    op.drop_index("ix_previews_sandbox", "previews")
    op.drop_table("previews")
