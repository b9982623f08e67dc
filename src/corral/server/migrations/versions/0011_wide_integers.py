"""64-bit audit ids and blob sizes on PostgreSQL.

SQLite's integers are 64-bit whatever the declared type; PostgreSQL's INTEGER is 32-bit, too
small for a blob above 2 GiB (uploads may reach 8 GiB) and for the ids of a busy shared audit
log (2^31 entries).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("audit", "id", type_=sa.BigInteger, existing_type=sa.Integer)
    op.alter_column("blobs", "size", type_=sa.BigInteger, existing_type=sa.Integer)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("blobs", "size", type_=sa.Integer, existing_type=sa.BigInteger)
    op.alter_column("audit", "id", type_=sa.Integer, existing_type=sa.BigInteger)
