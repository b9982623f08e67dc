"""The audit log: one row per API action.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("client", sa.String(64)),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("operation", sa.String(200)),
        sa.Column("sandbox_id", sa.String(80), nullable=True),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("bytes_in", sa.BigInteger),
        sa.Column("bytes_out", sa.BigInteger),
        sa.Column("duration", sa.Float),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_audit_key_at", "audit", ["key_id", "at"])
    op.create_index("ix_audit_sandbox_at", "audit", ["sandbox_id", "at"])
    op.create_index("ix_audit_at", "audit", ["at"])


def downgrade() -> None:
    op.drop_table("audit")
