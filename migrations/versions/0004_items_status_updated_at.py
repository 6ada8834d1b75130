"""items (status, updated_at): the reconciler's look-ups of stale claims and lost messages

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 22:30:00
"""

from __future__ import annotations

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index('ix_items_status_updated_at', ['status', 'updated_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_status_updated_at')
