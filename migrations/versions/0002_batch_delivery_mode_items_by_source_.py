"""batch delivery mode, items by source location

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 20:07:10.426896
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('via', sa.String(length=8), server_default='bytes', nullable=False))

    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index('ix_items_source_uri', ['source_uri'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_source_uri')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('via')

