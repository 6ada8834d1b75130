"""retention: purged records keep their audit columns

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 00:50:00
"""

from __future__ import annotations

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
