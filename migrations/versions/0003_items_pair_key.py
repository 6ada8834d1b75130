"""items.pair_key: the name front and back of one card share

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 22:35:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pair_key', sa.Text(), nullable=True))
        batch_op.create_index(
            'ix_items_batch_id_pair_key', ['batch_id', 'pair_key'], unique=False,
            postgresql_where=sa.text('pair_key IS NOT NULL'), sqlite_where=sa.text('pair_key IS NOT NULL'),
        )


def downgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_batch_id_pair_key')
        batch_op.drop_column('pair_key')
