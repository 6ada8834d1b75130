"""retention: purged records keep their audit columns

``items.purged_at`` marks an item whose personal data retention removed (its names, its
result's fields); a partial index finds the items not purged yet, oldest first.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 00:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purged_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            'ix_items_unpurged_updated_at',
            ['updated_at', 'id'],
            unique=False,
            postgresql_where=sa.text('purged_at IS NULL'),
            sqlite_where=sa.text('purged_at IS NULL'),
        )


def downgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index(
            'ix_items_unpurged_updated_at',
            postgresql_where=sa.text('purged_at IS NULL'),
            sqlite_where=sa.text('purged_at IS NULL'),
        )
        batch_op.drop_column('purged_at')
