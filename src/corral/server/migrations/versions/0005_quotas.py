"""Per-key quotas, set by an admin.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("cpu", sa.Float, nullable=True),
        *(
            sa.Column(name, sa.BigInteger, nullable=True)
            for name in ("memory_mb", "disk_mb", "volume_mb", "snapshot_bytes", "blob_bytes")
        ),
    )


def downgrade() -> None:
    op.drop_table("quotas")
